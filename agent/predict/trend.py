"""The trend machinery every trend predictor shares: windows, line fits, when a line may be trusted.

A trend predictor watches one statistic per row (a tensor, a module) and asks whether it heads
for a limit: a least-squares line through the row's points of the last ``trend.window_steps``
steps of the current timeline (on a log scale for multiplicative quantities), and its ETA in
steps to the limit.  A fitted line is worth a warning only when all of these hold, and is
retracted as soon as one fails:

* **enough points** (``trend.min_points``) and a slope that is not noise: t-statistic of the
  slope (slope / standard error) of at least ``trend.min_t`` (4: with the zone and sustain tests
  below it needs no more, and 6 missed two of the zoo's nine attention divergences at their start);
* **still rising**: the slope over the most recent half of the window is at least
  ``trend.sustain`` times the slope over the whole window.  Growth that slows down (the rise
  from initialisation every healthy run shows, a trend that has ended) is not extrapolated;
* **not extrapolated too far**: the ETA is at most ``trend.max_reach`` times the span the line
  was fitted on;
* **in the zone where the predictor's mechanism acts** (each predictor's ``watching`` rule: an
  attention logit of at least 1e2, √v̂ within a few decades of ε...).

The window is counted in steps, not in messages, so the same trend is seen as early whether a
statistic arrives every step or, like the probes, every tenth.  A warning is an ETA at most
``trend.warn_eta_steps``; **critical** is the limit crossed, or an ETA at most
``trend.critical_eta_steps`` on a line that passed every test (what prevention acts on, before
the loss moves).

Refits: a fit over 1,000 tensors costs several times what taking in the message does, so a
predictor whose last fit found nothing refits once ``trend.every_steps`` steps have passed; one
with a forecast refits on every message; a value newly past the limit refits at once
(``past_limit``), so a critical detection is never late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from agent.history import StatWindow
from agent.predict.base import Forecast, Predictor
from agent.predict.fit import current_segment, fit_lines
from sentinel_contract.protocol import Layout, StatsMessage
from sentinel_contract.typedconfig import option

if TYPE_CHECKING:
    from agent.history import SeriesHistory

MAX_LAYOUTS = 64
CURVE_POINTS = 64


@dataclass
class TrendConfig:
    window_steps: int = option(
        60, range=(4, 100_000), doc="Steps of history each line is fitted on (the current timeline's points in them)."
    )
    min_points: int = option(5, range=(3, 100_000), doc="Fewest finite points a line needs.")
    min_t: float = option(
        4.0,
        range=(0.0, 1e6),
        doc="Smallest t-statistic of the slope (slope / its standard error): noise is not a trend.",
    )
    sustain: float = option(
        0.5,
        range=(0.0, 10.0),
        doc="The slope over the latest half of the window must be at least this fraction of the whole "
        "window's: a rise that slows down (as every healthy run's does after initialisation) is not extrapolated.",
    )
    max_reach: float = option(
        3.0, range=(0.1, 1e6), doc="An ETA may be at most this many times the span the line was fitted on."
    )
    warmup_steps: int = option(
        0, range=(0, 100_000_000), doc="Steps before which trend predictors ignore the statistics."
    )
    warn_eta_steps: int = option(200, range=(0, 100_000_000), doc="An ETA at or below this is a warning detection.")
    critical_eta_steps: int = option(
        25,
        range=(0, 100_000_000),
        doc="An ETA at or below this is critical (what prevention acts on); 0: critical only past the limit.",
    )
    max_eta_steps: int = option(
        100_000, range=(1, 1_000_000_000), doc="ETAs beyond this are not reported (extrapolating too far)."
    )
    baseline_points: int = option(
        10, range=(1, 10_000), doc="Values whose median is a row's early baseline (out_rms, log Z, spread)."
    )
    every_steps: int = option(
        20,
        range=(1, 100_000),
        doc="Refit a predictor whose last fit found nothing once this many steps have passed (1: on every "
        "message); one with a forecast is refitted on every message and a value newly past a limit refits at "
        "once, so only the first sight of a trend can come up to every_steps - 1 steps late.",
    )


class Line(NamedTuple):
    """One row's fitted line and the tests it passed; ``y`` values are the predictor's scale."""

    slope: float
    at_last: float
    t: float
    points: int
    span: float
    recent_slope: float
    trusted: bool  # every test of the docstring but the predictor's own zone


def fit_rows(steps: np.ndarray, y: np.ndarray, ok: np.ndarray, cfg: TrendConfig) -> list[Line]:
    """A line per column of ``y`` over ``steps``, with its trust tests."""
    slope, at_last, _, n, t = fit_lines(steps, y, ok)
    half = steps >= steps[-1] - cfg.window_steps / 2
    if half.sum() >= 3:
        rslope, _, _, rn, _ = fit_lines(steps[half], y[half], ok[half])
    else:
        rslope, rn = np.zeros_like(slope), np.zeros_like(n)
    okf = ok.astype(np.float64)
    first = np.where(ok.any(axis=0), np.argmax(ok, axis=0), 0)
    span = (steps[-1] - steps[first]).astype(np.float64) * (okf.sum(axis=0) > 1)
    out = []
    for r in range(y.shape[1]):
        trusted = bool(
            n[r] >= cfg.min_points
            and t[r] >= cfg.min_t
            and slope[r] > 0
            and rn[r] >= 3
            and rslope[r] >= cfg.sustain * slope[r]
        )
        out.append(Line(float(slope[r]), float(at_last[r]), float(t[r]), int(n[r]), float(span[r]),
                        float(rslope[r]), trusted))  # fmt: skip
    return out


class TrendPredictor(Predictor):
    """A predictor over one per-row statistic; subclasses give ``forecasts`` and ``past_limit``."""

    kind = "trend"
    stat: str = ""

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self.trend: TrendConfig = cfg.trend
        self._fitted_at: dict[Layout, int] = {}
        self._trending: set[Layout] = set()

    def wants(self, msg: StatsMessage) -> bool:
        return self.stat in msg.layout.stats

    def update(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast] | None:
        if msg.step < self.trend.warmup_steps:
            return []
        self.observe(msg)
        last = self._fitted_at.get(msg.layout)
        due = last is None or msg.layout in self._trending or not last < msg.step < last + self.trend.every_steps
        if not due and not self.past_limit(msg):
            return None
        if len(self._fitted_at) >= MAX_LAYOUTS and msg.layout not in self._fitted_at:
            self._fitted_at.clear()
            self._trending.clear()
        out = self.forecasts(msg, series)
        self._fitted_at[msg.layout] = msg.step
        (self._trending.add if out else self._trending.discard)(msg.layout)
        return out

    def rewind(self, to_step: int) -> None:
        self._fitted_at.clear()
        self._trending.clear()

    def observe(self, msg: StatsMessage) -> None:
        """Called on every message before any fit (for state that must see each one)."""

    def past_limit(self, msg: StatsMessage) -> bool:
        """Whether a value of this message is past the predictor's limit (a cheap row-wise check)."""
        return False

    def forecasts(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        raise NotImplementedError

    # -- helpers for subclasses

    def windows(self, series: SeriesHistory, stat: str, msg: StatsMessage) -> list[StatWindow]:
        """The current timeline's points of ``stat`` in the last ``window_steps`` steps, for this
        message's layout only (other layouts were seen with their own messages)."""
        out = []
        for w in series.stat_windows(stat, self.trend.window_steps + 1):
            if w.tensors != msg.layout.tensors:
                continue
            seg = current_segment(w.steps, max(self.trend.warmup_steps, int(w.steps[-1]) - self.trend.window_steps))
            if seg.stop - seg.start:
                out.append(StatWindow(w.tensors, w.steps[seg], w.values[seg].astype(np.float64)))
        return out

    def judge(self, line: Line, y_now: float, y_limit: float) -> tuple[float | None, str | None, float]:
        """(ETA, severity, risk) of a row whose value ``y_now`` rises towards ``y_limit``.

        Risk: 1 when critical; from 0.5 (ETA ``warn_eta_steps``) to 1 (ETA ``critical_eta_steps``) for a
        warning; below 0.5, falling to 0 at ``predict.horizon_steps``, for a forecast too far off to warn.
        """
        t = self.trend
        if y_now >= y_limit:
            return 0.0, "critical", 1.0
        if not line.trusted:
            return None, None, 0.0
        eta = (y_limit - line.at_last) / line.slope
        if not math.isfinite(eta) or eta > t.max_eta_steps or eta > t.max_reach * max(line.span, 1.0):
            return None, None, 0.0
        eta = max(0.0, eta)
        if eta <= t.critical_eta_steps:
            return eta, "critical", 1.0
        if eta <= t.warn_eta_steps:
            return (
                eta,
                "warning",
                1.0 - 0.5 * (eta - t.critical_eta_steps) / max(1, t.warn_eta_steps - t.critical_eta_steps),
            )
        horizon = max(self.cfg.horizon_steps, t.warn_eta_steps + 1)
        return eta, None, max(0.0, 0.5 * (horizon - eta) / (horizon - t.warn_eta_steps))

    def forecast(
        self,
        layer: str,
        stat: str,
        value: float,
        step: int,
        eta: float | None,
        severity: str | None,
        risk: float,
        message: str,
        line: Line,
        curve: dict,
        **evidence,
    ) -> Forecast:
        ev = {"slope_per_step": line.slope, "recent_slope_per_step": line.recent_slope, "t": line.t,
              "points": line.points, "span_steps": line.span, "curve": curve, **evidence}  # fmt: skip
        return Forecast(self.name, layer, stat, value, step, eta, severity, risk, message, ev)


def curve(steps: np.ndarray, values: np.ndarray, line: Line, limit: float, scale: str) -> dict:
    """What the status page and the report draw: the points (in the statistic's units), the fitted
    line and the limit.  ``scale`` "log": the line is value = at_value · exp(slope · (step − at_step));
    "linear": value = at_value + slope · (step − at_step)."""
    keep = np.isfinite(values)
    s, v = steps[keep][-CURVE_POINTS:], values[keep][-CURVE_POINTS:]
    at = math.exp(line.at_last) if scale == "log" else line.at_last
    return {"steps": [int(x) for x in s], "values": [float(x) for x in v], "scale": scale, "slope": line.slope,
            "at_step": int(steps[-1]), "at_value": at, "limit": float(limit)}  # fmt: skip
