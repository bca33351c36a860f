"""ε-stall (Wortsman et al., *Small-scale proxies for large-scale Transformer training instabilities*,
arXiv:2309.14322, §3.4): when a tensor's gradient RMS falls towards Adam's ε, the update
m̂/(√v̂ + ε) shrinks with it and training stalls although nothing else is wrong.

Reads ``sqrt_v_rms`` (the RMS of the bias-corrected √v̂; else ``grad_rms``) per tensor, against
the ε actually in force: the trainer's per-tensor ``adam_eps`` column (with ε auto-tuning each
tensor has its own), else its ``adam_eps`` scalar, else ``adam_eps.eps``.  Only tensors that are
being trained count: a tensor whose gradient is zero (a bias that gets no gradient by
construction, a frozen weight) has √v̂ = 0 and no update to shrink.  With roles on the wire, only
weight matrices and embeddings count (a gain's update is not what stalls training).

The line is fitted to -log √v̂, so the ETA is to √v̂ = ε (the update then is half what it would be
without ε).  √v̂ below ``margin`` × ε on its last ``trend.min_points`` points is a warning whatever
the trend (the update is already shrunk by 1/(1 + 1/margin); one point is not a level: at step 0,
before ε auto-tuning has set anything, every tensor is briefly there); lines are watched once √v̂
is within ``watch`` × ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.predict.roles import trained_rows
from agent.predict.trend import TrendPredictor, curve, fit_rows
from sentinel_contract.typedconfig import option


@dataclass
class AdamEpsConfig:
    enabled: bool = option(True, doc="Watch `sqrt_v_rms` (else `grad_rms`) falling towards the Adam ε in force.")
    eps: float = option(
        1e-8, range=(0.0, 1.0), doc="Adam ε when the trainer sends neither a column nor a scalar `adam_eps`."
    )
    margin: float = option(
        10.0, range=(1.0, 1e6), doc="√v̂ below margin × ε is a warning (the update is already shrunk)."
    )
    watch: float = option(1e3, range=(1.0, 1e30), doc="Lines are extrapolated only once √v̂ is within watch × ε.")


class AdamEps(TrendPredictor):
    name = key = "adam_eps"
    Config = AdamEpsConfig

    def wants(self, msg) -> bool:
        return "sqrt_v_rms" in msg.layout.stats or "grad_rms" in msg.layout.stats

    def _stat(self, msg) -> str:
        return "sqrt_v_rms" if "sqrt_v_rms" in msg.layout.stats else "grad_rms"

    def eps(self, msg) -> np.ndarray:
        """The ε in force per row of this message's layout."""
        stats = msg.layout.stats
        if "adam_eps" in stats:
            col = msg.matrix[:, stats.index("adam_eps")].astype(np.float64)
            if np.isfinite(col).all() and (col > 0).all():
                return col
        eps = msg.scalar("adam_eps")
        if eps is None or not math.isfinite(eps) or eps <= 0:
            eps = self.c.eps
        return np.full(len(msg.layout.tensors), float(eps))

    def past_limit(self, msg) -> bool:
        v = msg.matrix[:, msg.layout.stats.index(self._stat(msg))]
        return bool(((v > 0) & (v <= self.c.margin * self.eps(msg)) & trained_rows(msg)).any())

    def forecasts(self, msg, series):
        stat, eps, c, out = self._stat(msg), self.eps(msg), self.c, []
        if not (eps > 0).any():
            return out
        trained = trained_rows(msg)
        for w in self.windows(series, stat, msg):
            ok = np.isfinite(w.values) & (w.values > 0)
            y = -np.log(np.where(ok, w.values, 1.0))
            lines = fit_rows(w.steps, y, ok, self.trend)
            for r, line in enumerate(lines):
                v, e = float(w.values[-1, r]), float(eps[r])
                if not trained[r] or not ok[-1, r] or e <= 0 or v > c.watch * e:
                    continue
                eta, severity, risk = self.judge(line, -math.log(v), -math.log(e))
                below = ok[:, r] & (w.values[:, r] <= c.margin * e)
                if severity is None and below[-self.trend.min_points :].sum() >= self.trend.min_points:
                    eta, severity, risk = (eta if eta is not None else math.inf), "warning", max(risk, 0.5)
                if eta is None:
                    continue
                layer = w.tensors[r]
                message = f"{stat} of {layer} is {v:.3g}, {v / e:.2f}× the Adam ε {e:g} in force"
                if v <= e:
                    message += "; its updates are more than halved (Wortsman §3.4)"
                elif math.isfinite(eta) and line.trusted:
                    message += f", fell {math.exp(line.slope * line.span):.2f}× over {line.span:.0f} steps; ETA to ε: {eta:.0f} steps"
                fc = curve(w.steps, w.values[:, r], line._replace(slope=-line.slope, at_last=-line.at_last), e, "log")
                out.append(self.forecast(layer, stat, v, int(w.steps[-1]), None if not math.isfinite(eta) else eta,
                                         severity, risk, message, line, fc, eps=e, margin=c.margin))  # fmt: skip
        return out
