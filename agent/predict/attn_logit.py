"""Attention-logit growth (Wortsman et al., *Small-scale proxies for large-scale Transformer training
instabilities*, arXiv:2309.14322, §3.1.1): without QK-norm the max attention logit grows until
attention collapses onto single tokens and the loss diverges; every run of theirs past 1e4 did.

Reads the probes' ``attn_logit_max`` per attention module, on a log scale.  A line is watched
once the logit reaches ``watch_from`` (1e2, two decades below the limit): attention is then one-hot
for all practical purposes, while healthy runs of the zoo (benchmarks/divergence.py) plateau at
10-50 after their rise from initialisation.  The ETA is to ``limit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.predict.trend import TrendPredictor, curve, fit_rows
from sentinel_contract.typedconfig import option


@dataclass
class AttnLogitConfig:
    enabled: bool = option(True, doc="Watch statistic `attn_logit_max` (per attention module, from the probes).")
    limit: float = option(1e4, range=(1.0, 1e30), doc="Max attention logit treated as divergence (Wortsman §3.1.1).")
    watch_from: float = option(
        100.0, range=(0.0, 1e30), doc="Logits below this are not extrapolated (healthy runs rise to 10-50 and stay)."
    )


class AttnLogit(TrendPredictor):
    name = key = "attn_logit"
    Config = AttnLogitConfig
    stat = "attn_logit_max"

    def past_limit(self, msg) -> bool:
        col = msg.matrix[:, msg.layout.stats.index(self.stat)]
        return bool((col >= self.c.limit).any())

    def forecasts(self, msg, series):
        limit, out = self.c.limit, []
        for w in self.windows(series, self.stat, msg):
            ok = np.isfinite(w.values) & (w.values > 0)
            y = np.log(np.where(ok, w.values, 1.0))
            lines = fit_rows(w.steps, y, ok, self.trend)
            for r, line in enumerate(lines):
                v = float(w.values[-1, r])
                if not ok[-1, r] or v < self.c.watch_from:
                    continue
                eta, severity, risk = self.judge(line, math.log(v), math.log(limit))
                if eta is None:
                    continue
                layer = w.tensors[r]
                if eta == 0.0:
                    message = f"attn_logit_max of {layer} is {v:.4g}, past {limit:g} (Wortsman: runs past 1e4 diverge)"
                else:
                    growth = math.exp(line.slope * line.span)
                    message = (f"attn_logit_max of {layer} is {v:.4g}, rose {growth:.2f}× over {line.span:.0f} steps; "
                               f"ETA to {limit:g}: {eta:.0f} steps")  # fmt: skip
                out.append(self.forecast(layer, self.stat, v, int(w.steps[-1]), eta, severity, risk, message, line,
                                         curve(w.steps, w.values[:, r], line, limit, "log")))  # fmt: skip
        return out
