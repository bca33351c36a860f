"""A trend forecast's curve, as the status page and the run report draw it.

A trend predictor's forecast carries ``evidence["curve"]`` (``agent.predict.trend.curve``): the
points its line was fitted on (in the statistic's own units), the line (``scale`` "log":
value = at_value · exp(slope · (step − at_step)); "linear": at_value + slope · (step − at_step))
and the ``limit`` it heads to.  A jump forecast (``update_ratio``) has slope 0: points and limit
only.  ``check`` turns what arrives (a live forecast, or an events.jsonl record written by any
version of the agent) into a ``Curve`` or the reason it cannot be drawn, and never raises.
``view`` is what both drawings share: the steps shown (a far ETA is clipped, so it does not
squash the points), where the line ends, where the ETA falls and the values shown.  The status
page's script repeats ``view`` in JavaScript (``forecastView`` in agent/status_assets.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALES = ("log", "linear")
MAX_POINTS = 256  # the predictors send at most 64
EXTEND = 3.0  # the future shown: at most this many times the points' span past the last point (trend.max_reach)
STRETCH = 0.25  # without an ETA the line goes this fraction of the span past the last point
PAD = 0.06  # of the value range, above and below
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # as agent.events.plain writes them


def number(value: object) -> float | None:
    """A JSON number (or the event log's spelling of a non-finite one) as a float; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return None


def finite(value: object) -> float | None:
    v = number(value)
    return v if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class Curve:
    steps: tuple[int, ...]  # increasing
    values: tuple[float, ...]  # finite (and positive on a log scale)
    scale: str
    slope: float
    at_step: int
    at_value: float
    limit: float
    left_out: int = 0  # points that could not be drawn (non-finite, or not positive on a log scale)

    @property
    def log(self) -> bool:
        return self.scale == "log"

    @property
    def has_line(self) -> bool:
        return self.slope != 0.0 and (self.at_value > 0 or not self.log)

    def at(self, step: float) -> float:
        """The fitted line's value at ``step``."""
        if self.log:
            return self.at_value * math.exp(min(700.0, self.slope * (step - self.at_step)))
        return self.at_value + self.slope * (step - self.at_step)

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "values": list(self.values), "scale": self.scale, "slope": self.slope,
                "at_step": self.at_step, "at_value": self.at_value, "limit": self.limit}  # fmt: skip


def check(raw: object) -> Curve | str:
    """The curve of a forecast's evidence, or why it cannot be drawn (a sentence fragment)."""
    if raw is None:
        return "no curve in its evidence"
    if not isinstance(raw, dict):
        return "its curve is not an object"
    steps, values = raw.get("steps"), raw.get("values")
    if not isinstance(steps, list) or not isinstance(values, list):
        return "its curve has no list of steps and values"
    if len(steps) != len(values):
        return f"its curve has {len(steps)} steps but {len(values)} values"
    scale = raw.get("scale")
    if scale not in SCALES:
        return f"its curve's scale is {str(scale)[:20]!r}, not log or linear"
    fields = {}
    for key in ("slope", "at_step", "at_value", "limit"):
        fields[key] = finite(raw.get(key))
        if fields[key] is None:
            return f"its curve's {key} is not a finite number"
    if scale == "log" and fields["limit"] <= 0:
        return "its curve's limit is not positive on a log scale"
    points = []
    for s, v in zip(steps, values):
        step = finite(s)
        if step is None or step != int(step):
            return "its curve's steps are not all integers"
        value = number(v)
        if value is None:
            return "its curve's values are not all numbers"
        points.append((int(step), value))
    points.sort(key=lambda p: p[0])
    drawn = [(s, v) for s, v in points if math.isfinite(v) and (v > 0 or scale == "linear")][-MAX_POINTS:]
    if not drawn:
        return "its curve has no point that can be drawn"
    return Curve(tuple(s for s, _ in drawn), tuple(v for _, v in drawn), scale, fields["slope"],
                 int(fields["at_step"]), fields["at_value"], fields["limit"], len(points) - len(drawn))  # fmt: skip


def eta_of(value: object) -> float | None:
    """An ETA in steps, if it is one (finite, not negative)."""
    v = finite(value)
    return v if v is not None and v >= 0 else None


@dataclass(frozen=True)
class View:
    x0: float  # steps shown
    x1: float
    line: tuple[tuple[float, float], tuple[float, float]] | None  # (step, value) at both ends; None: no line
    eta_step: float | None  # where the line reaches the limit; None without an ETA
    eta_shown: bool  # whether that step is within the steps shown (else it is clipped away)
    log: bool
    lo: float  # values shown, padded, in ``ty`` units (log10 of the value on a log scale)
    hi: float

    def ty(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def value(self, t: float) -> float:
        """The value at ``t`` in ``ty`` units (for axis labels)."""
        return 10.0**t if self.log else t


def view(c: Curve, eta: object) -> View:
    """What to draw: from the first point to the ETA, or to the last point plus ``STRETCH`` of the
    points' span without an ETA; never further than ``EXTEND`` spans past the last point."""
    first, last = c.steps[0], c.steps[-1]
    span = max(last - first, 1)
    e = eta_of(eta)
    eta_step = None if e is None else c.at_step + e
    end = eta_step if eta_step is not None and c.has_line else last + STRETCH * span
    end = min(max(end, last), last + EXTEND * span)
    x0, x1 = float(first), float(max(end, first + 1))
    line = ((x0, c.at(x0)), (end, c.at(end))) if c.has_line else None
    if line and not all(math.isfinite(v) and (v > 0 or not c.log) for _, v in line):
        line = None  # a line too steep to draw on this scale: the points and the limit still are
    ys = [*c.values, c.limit, *((line[0][1], line[1][1]) if line else ())]
    ty = [math.log10(v) for v in ys] if c.log else ys
    lo, hi = min(ty), max(ty)
    pad = (hi - lo) * PAD if hi > lo else (0.05 if c.log else abs(lo) * 0.05 or 1.0)
    shown = eta_step is not None and eta_step <= x1 + 1e-9
    return View(x0, x1, line, eta_step, shown, c.log, lo - pad, hi + pad)
