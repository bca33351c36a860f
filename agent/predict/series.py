"""Every predictor of one run/rank, the episodes that keep detections from repeating, and the risk.

Detections are edge-triggered: one per episode (a run of consecutive outliers, or a trend
predictor's layers entering the warning or critical zone), again only if the severity rises.  A forecast lives until
its predictor refits without it (its trend ended: agent/predict/trend.py) or until its statistic
has not been seen for ``trend.window_steps`` steps.  ``risk()`` folds the latest detections
(1 critical, 0.5 warning, decaying over ``detection_decay_steps``) and forecasts (``TrendPredictor.judge``:
1 when critical, 0.5 to 1 in the warning zone, below 0.5 beyond it) into one score in [0, 1] with a
one-line explanation: 0.5 and above means a warning stands.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.predict.base import Detection, Forecast, Predictor, Risk, severity_rank
from sentinel_contract.protocol import StatsMessage

if TYPE_CHECKING:
    from agent.history import SeriesHistory
    from agent.predict.config import PredictConfig


class SeriesPredictor:
    """The predictors of ``agent.predict.registry.PREDICTORS`` for one (run, rank)."""

    def __init__(self, run: str, rank: int, cfg: PredictConfig):
        from agent.predict.registry import PREDICTORS

        self.run, self.rank, self.cfg = run, rank, cfg
        self.predictors: list[Predictor] = [p(cfg, run, rank) for p in PREDICTORS]
        self.predictors = [p for p in self.predictors if p.enabled]
        self.forecasts: dict[tuple[str, str], Forecast] = {}
        self.last_detection: dict[str, Detection] = {}
        self._level: dict[str, int] = {}  # highest severity of each predictor's current episode
        self.step = -1
        self.version = 0  # bumped when the forecasts or detections change: with the step, all risk() reads

    def observe(self, msg: StatsMessage, series: SeriesHistory) -> list[Detection]:
        self.step = msg.step
        found: list[Detection] = []
        changed = False
        for p in self.predictors:
            if not p.wants(msg):
                continue
            result = p.update(msg, series)
            if p.kind == "event":
                found += result or []
            elif result is not None:
                found += self._episodes(p.name, result)
                changed = True
        changed |= self._expire()
        for d in found:
            self.last_detection[d.detector] = d
        self.version += bool(found) or changed
        return found

    def _episodes(self, predictor: str, forecasts: list[Forecast]) -> list[Detection]:
        """Replace ``predictor``'s forecasts; a detection when its highest severity rises.

        One episode per predictor, not per layer: a mechanism reaching twelve matrices at once is
        one warning, naming the riskiest layer and how many share its severity.
        """
        for key in [k for k in self.forecasts if k[0] == predictor]:
            del self.forecasts[key]
        for f in forecasts:
            self.forecasts[(predictor, f.layer)] = f
        level = max((severity_rank(f.severity) for f in forecasts), default=0)
        out = []
        if level > self._level.get(predictor, 0):
            top = max((f for f in forecasts if severity_rank(f.severity) == level), key=lambda f: f.risk)
            layers = sorted(f.layer for f in forecasts if severity_rank(f.severity) == level)
            d = top.detection(self.run, self.rank)
            out.append(Detection(d.run, d.rank, d.step, d.detector, d.severity, d.statistic, d.value,
                                 d.message + (f" (and {len(layers) - 1} more layer(s))" if len(layers) > 1 else ""),
                                 layer=d.layer, eta_steps=d.eta_steps,
                                 evidence={**d.evidence, "layers": layers[:16], "layer_count": len(layers)}))  # fmt: skip
        self._level[predictor] = level
        return out

    def _expire(self) -> bool:
        """Drop forecasts whose statistic stopped arriving."""
        horizon = self.step - self.cfg.trend.window_steps
        stale = [k for k, f in self.forecasts.items() if f.step < horizon]
        for key in stale:
            del self.forecasts[key]
        for predictor in {k[0] for k in stale}:
            self._level[predictor] = max(
                (severity_rank(f.severity) for k, f in self.forecasts.items() if k[0] == predictor), default=0
            )
        return bool(stale)

    def risk_settled(self) -> bool:
        """Whether ``risk()`` stays as it is until ``version`` changes (no detection still decaying)."""
        decay = self.cfg.detection_decay_steps
        return all(self.step - d.step >= decay for d in self.last_detection.values())

    def rewind(self, to_step: int) -> None:
        for p in self.predictors:
            p.rewind(to_step)
        self.version += 1
        self.forecasts.clear()
        self._level.clear()

    def etas(self) -> dict[str, float]:
        """Smallest ETA per trend predictor."""
        out: dict[str, float] = {}
        for (pred, _), f in self.forecasts.items():
            if f.eta_steps is not None:
                out[pred] = min(out.get(pred, math.inf), f.eta_steps)
        return out

    def top_forecasts(self) -> dict[str, Forecast]:
        """The riskiest forecast per trend predictor."""
        out: dict[str, Forecast] = {}
        for (pred, _), f in self.forecasts.items():
            if pred not in out or f.risk > out[pred].risk:
                out[pred] = f
        return out

    def risk(self) -> Risk:
        best = Risk(0.0, "no risk detected")
        for d in self.last_detection.values():
            weight = 1.0 if d.severity == "critical" else 0.5
            age = max(0, self.step - d.step) if self.step >= d.step else 0
            score = weight * max(0.0, 1.0 - age / self.cfg.detection_decay_steps)
            if score > best.score:
                best = Risk(score, f"{d.detector}: {d.message}", d.detector, d.layer)
        for f in self.forecasts.values():
            if f.risk > best.score:
                best = Risk(f.risk, f"{f.predictor}: {f.message}", f.predictor, f.layer)
        return Risk(round(min(1.0, best.score), 4), best.explanation, best.predictor, best.layer)
