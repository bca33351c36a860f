"""Linear-output growth (Rybakov et al., *Methods of Improving LLM Training Stability*, arXiv:2410.16682):
before divergence the L2 norms of the QKV, Proj and FC2 outputs grow more than 2× against a
converging run.

The agent has no converging run to compare with, only the row's own early value (the median of
its first ``trend.baseline_points`` values), and in the zoo that is not enough: the stable twins
at high learning rates grow their outputs 10-100× over their early value too, so this predictor
is **off by default** (its statistics are still exported).  Turned on, it extrapolates log(out_rms
/ baseline) towards ``max_growth`` once the growth reaches ``watch_from``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.predict.fit import Baselines
from agent.predict.trend import TrendPredictor, curve, fit_rows
from sentinel_contract.typedconfig import option


@dataclass
class OutRmsConfig:
    enabled: bool = option(
        False, doc="Watch statistic `out_rms` (per linear module, from the probes) against its early value."
    )
    max_growth: float = option(100.0, range=(1.0, 1e6), doc="Growth over the row's early value treated as divergence.")
    watch_from: float = option(10.0, range=(1.0, 1e6), doc="Growths below this are not extrapolated.")


class OutRms(TrendPredictor):
    name = key = "out_rms"
    Config = OutRmsConfig
    stat = "out_rms"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self.baselines = Baselines(cfg.trend.baseline_points)
        self._base: dict[tuple[str, ...], np.ndarray] = {}

    def past_limit(self, msg) -> bool:
        base = self._base.get(msg.layout.tensors)
        col = msg.matrix[:, msg.layout.stats.index(self.stat)]
        return base is not None and bool((col >= self.c.max_growth * base).any())

    def forecasts(self, msg, series):
        out = []
        for w in self.windows(series, self.stat, msg):
            offered = [self.baselines.offer(("out_rms", t), w.steps, w.values[:, r]) for r, t in enumerate(w.tensors)]
            base = np.array([math.nan if b is None else b for b in offered])
            self._base[w.tensors] = base
            good = np.isfinite(base) & (base > 0)
            ok = np.isfinite(w.values) & (w.values > 0) & good[None, :]
            growth = np.where(ok, w.values / np.where(good, base, 1.0)[None, :], 1.0)
            lines = fit_rows(w.steps, np.log(growth), ok, self.trend)
            for r, line in enumerate(lines):
                g = float(growth[-1, r])
                if not ok[-1, r] or g < self.c.watch_from:
                    continue
                eta, severity, risk = self.judge(line, math.log(g), math.log(self.c.max_growth))
                if eta is None:
                    continue
                layer = w.tensors[r]
                message = f"out_rms of {layer} is {g:.2f}× its early value {base[r]:.4g}"
                message += (
                    f" (limit {self.c.max_growth:g}×)"
                    if eta == 0.0
                    else f"; ETA to {self.c.max_growth:g}×: {eta:.0f} steps"
                )
                fc = curve(w.steps, w.values[:, r], line._replace(at_last=line.at_last + math.log(base[r])),
                           self.c.max_growth * base[r], "log")  # fmt: skip
                out.append(self.forecast(layer, self.stat, float(w.values[-1, r]), int(w.steps[-1]), eta, severity,
                                         risk, message, line, fc, baseline=float(base[r])))  # fmt: skip
        return out
