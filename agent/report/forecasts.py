"""The report's Forecasts: a panel per episode of a trend detection, drawn from the event log alone.

A trend predictor's detection carries the curve its line was fitted on (agent/curve.py), and
every ``decision`` or ``suppressed`` record of ``events.jsonl`` carries the detection's evidence,
curve included.  Each such record is one episode (a trend entering the warning zone, or rising
to critical) and gets a panel: the points, the fitted line to the ETA (clipped as on the status
page, ``agent.curve.view``), the limit, the detection's step and the ETA.  At most
``MAX_PANELS`` per run: the first warning and the first critical of each predictor, then the
others in order; a note says how many were left out.  A trend record whose curve is missing (an
older agent) or malformed is a note, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.curve import Curve, check, eta_of, view
from agent.predict import TREND_PREDICTORS
from agent.report import plots

MAX_PANELS = 12
MAX_NOTES = 10
LINE_COLOR, LIMIT_COLOR, ETA_COLOR, STEP_COLOR = "#e08a00", "#d62728", "#7a5200", "#57606a"


@dataclass
class ForecastPanel:
    index: int  # the record's number in the run's events table (1-based)
    record: dict
    curve: Curve
    png: bytes | None = None
    file: str | None = None

    @property
    def title(self) -> str:
        r = self.record
        return " / ".join(str(x) for x in (r.get("detector"), r.get("layer"), r.get("severity")) if x is not None)


@dataclass
class Forecasts:
    panels: list[ForecastPanel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.panels or self.notes)


def describe(index: int, rec: dict) -> str:
    layer = f" {rec['layer']}" if rec.get("layer") else ""
    return f"event #{index} ({rec.get('detector')}/{rec.get('severity')}{layer} at step {rec.get('step')})"


def select(events: list[dict]) -> Forecasts:
    """The panels to draw for one run's records (oldest first), and notes on the rest."""
    out, bad = Forecasts(), []
    candidates: list[ForecastPanel] = []
    for i, rec in enumerate(events, 1):
        if rec.get("type") not in ("decision", "suppressed"):
            continue
        evidence = rec.get("evidence")
        if not (isinstance(evidence, dict) and "curve" in evidence) and rec.get("detector") not in TREND_PREDICTORS:
            continue  # an event detector's record (spike, NaN): nothing to fit
        curve = check(evidence.get("curve") if isinstance(evidence, dict) else None)
        if isinstance(curve, str):
            bad.append(f"{describe(i, rec)}: no chart, {curve}")
        else:
            candidates.append(ForecastPanel(i, rec, curve))
    firsts: dict[tuple, ForecastPanel] = {}
    for p in candidates:
        firsts.setdefault((p.record.get("detector"), p.record.get("severity")), p)
    chosen = list(firsts.values())[:MAX_PANELS]
    for p in candidates:
        if len(chosen) >= MAX_PANELS:
            break
        if p not in chosen:
            chosen.append(p)
    out.panels = sorted(chosen, key=lambda p: p.index)
    if len(candidates) > len(out.panels):
        out.notes.append(
            f"{len(candidates) - len(out.panels)} more trend detection(s) not drawn: at most {MAX_PANELS} panels "
            "per run, the first warning and the first critical of each predictor first"
        )
    out.notes += bad[:MAX_NOTES]
    if len(bad) > MAX_NOTES:
        out.notes.append(f"... and {len(bad) - MAX_NOTES} more trend detection(s) without a curve to draw")
    return out


def _text(value: object) -> str:
    """Text from the files, shown literally by matplotlib (a ``$`` would start mathtext)."""
    return str(value).replace("$", r"\$")


def figure(p: ForecastPanel) -> Any:
    """The points, the fitted line, the limit, the detection's step and the ETA of one record."""
    Figure, _, _ = plots._mpl()
    rec, c = p.record, p.curve
    eta = eta_of(rec.get("eta_steps"))
    v = view(c, eta)
    fig = Figure(figsize=(5.8, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(c.steps, c.values, s=9, color=plots.KEPT_COLOR, zorder=3, label="points the line was fitted on")
    if v.line is not None:
        (s0, y0), (s1, y1) = v.line
        ax.plot([s0, s1], [y0, y1], color=LINE_COLOR, lw=1.6, label="fitted line")
    ax.axhline(c.limit, color=LIMIT_COLOR, ls="--", lw=1.3, label=f"limit {plots._g(c.limit)}")
    step = rec.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and v.x0 <= step <= v.x1:
        ax.axvline(step, color=STEP_COLOR, ls=":", lw=1.2, label=f"detection at step {step}")
    if v.eta_step is not None and eta is not None:
        text = f"ETA {eta:.0f} steps (step {v.eta_step:.0f})"
        if v.eta_shown:
            ax.axvline(v.eta_step, color=ETA_COLOR, ls="-.", lw=1.1, label=text)
        else:
            low = (v.ty(c.limit) - v.lo) / (v.hi - v.lo) < 0.5  # the limit in the lower half: write it above
            ax.annotate(text + " →", xy=(0.99, 0.97 if low else 0.03), xycoords="axes fraction", ha="right",
                        va="top" if low else "bottom", fontsize=8, color=ETA_COLOR)  # fmt: skip
    pad = 0.015 * (v.x1 - v.x0)
    ax.set_xlim(v.x0 - pad, v.x1 + pad)
    if c.log:
        ax.set_yscale("log")
    ax.set_ylim(v.value(v.lo), v.value(v.hi))
    if c.log:
        plots.plain_log_ticks(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel(_text(rec.get("statistic") or "value") + (" (log scale)" if c.log else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    held = f", held back ({rec.get('why')})" if rec.get("type") == "suppressed" else ""
    ax.set_title(_text(p.title) + held, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return fig
