"""Output-logit divergence (Wortsman et al., *Small-scale proxies for large-scale Transformer training
instabilities*, arXiv:2309.14322, §3.1.2): without weight decay on the head or a z-loss, the
output logits drift until the softmax normaliser log Z runs away and the loss follows; z-loss
1e-4 keeps log Z near 0.

Reads the probes' log Z at the head: scalar ``log_z_mean``, scalar or statistic ``log_z_max``, as
a drift from the row's early value (the median of its first ``trend.baseline_points`` values),
on a linear scale.  Lines are watched once the drift reaches ``watch_drift`` (healthy runs of the
zoo wander up to about 2.6 nats from their early value); the ETA is to ``max_drift``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.history import StatWindow
from agent.predict.fit import Baselines, current_segment
from agent.predict.trend import TrendPredictor, curve, fit_rows
from sentinel_contract.typedconfig import option

NAMES = ("log_z_mean", "log_z_max")


@dataclass
class LogZConfig:
    enabled: bool = option(True, doc="Watch scalar `log_z_mean` and statistic/scalar `log_z_max` (from the probes).")
    max_drift: float = option(
        10.0, range=(1e-6, 1e6), doc="Drift of log Z from its early value treated as divergence (nats)."
    )
    watch_drift: float = option(
        3.0, range=(0.0, 1e6), doc="Drifts below this are not extrapolated (healthy runs wander up to ~2.6 nats)."
    )


class LogZ(TrendPredictor):
    name = key = "log_z"
    Config = LogZConfig

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self.baselines = Baselines(cfg.trend.baseline_points)

    def wants(self, msg) -> bool:
        return "log_z_max" in msg.layout.stats or any(n in msg.layout.scalars for n in NAMES)

    def _values(self, msg) -> list[tuple[str, float]]:
        out = [(n, msg.scalar(n)) for n in NAMES if n in msg.layout.scalars]
        if "log_z_max" in msg.layout.stats:
            out += zip(msg.layout.tensors, msg.matrix[:, msg.layout.stats.index("log_z_max")].tolist(), strict=True)
        return out

    def past_limit(self, msg) -> bool:
        for layer, v in self._values(msg):
            base = self.baselines.settled(("log_z", layer))
            if base is not None and abs(v - base) >= self.c.max_drift:
                return True
        return False

    def _windows(self, msg, series) -> list[StatWindow]:
        wins = self.windows(series, "log_z_max", msg) if "log_z_max" in msg.layout.stats else []
        for name in NAMES:
            if name in msg.layout.scalars:
                steps, values = series.scalar(name, self.trend.window_steps + 1)
                if len(steps):
                    seg = current_segment(steps, max(self.trend.warmup_steps, int(steps[-1]) - self.trend.window_steps))
                    if seg.stop - seg.start:
                        wins.append(StatWindow((name,), steps[seg], values[seg, None].astype(np.float64)))
        return wins

    def forecasts(self, msg, series):
        c, out = self.c, []
        for w in self._windows(msg, series):
            for r, layer in enumerate(w.tensors):
                base = self.baselines.offer(("log_z", layer), w.steps, w.values[:, r])
                if base is None:
                    continue
                drift = w.values[:, r] - base
                if not math.isfinite(drift[-1]) or abs(drift[-1]) < c.watch_drift:
                    continue
                sign = 1.0 if drift[-1] >= 0 else -1.0
                y = (sign * drift)[:, None]
                line = fit_rows(w.steps, y, np.isfinite(y), self.trend)[0]
                eta, severity, risk = self.judge(line, float(y[-1, 0]), c.max_drift)
                if eta is None:
                    continue
                v = float(w.values[-1, r])
                message = f"log Z ({layer}) is {v:.3g}, drifted {drift[-1]:+.3g} from its early value {base:.3g}"
                message += f" (limit ±{c.max_drift:g})" if eta == 0.0 else f"; ETA to ±{c.max_drift:g}: {eta:.0f} steps"
                stat = layer if layer in NAMES and len(w.tensors) == 1 else "log_z_max"
                shown = line._replace(at_last=base + sign * line.at_last, slope=sign * line.slope)
                fc = curve(w.steps, w.values[:, r], shown, base + sign * c.max_drift, "linear")
                out.append(self.forecast(layer, stat, v, int(w.steps[-1]), eta, severity, risk, message, line, fc,
                                         baseline=base, drift=float(drift[-1])))  # fmt: skip
        return out
