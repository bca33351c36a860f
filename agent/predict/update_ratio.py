"""A sudden change in the size of every update: the update ratio ‖ΔW‖/‖W‖ of the weight matrices
jumping at one step (Nishida et al., *Initialization of Large Language Models via Reparameterization
to Mitigate Loss Spikes*, arXiv:2406.16297: the update ratio is the spike precursor).

What makes every matrix's update several times larger from one step to the next is an LR fault
(a schedule bug, a resume with the wrong LR, a restart of a cyclic schedule) or a change of the
optimizer's state, and the loss follows within a few steps.  The zoo's stable runs, at LRs from
3e-3 to 0.5, never moved the update ratios' median more than 2× from one step to its recent past,
LR warm-up included, while an LR ×10 moves it ×10 at once.

The statistic: the median over the weight matrices (roles from the trainer; no gains or biases)
of ``update_ratio``, against the median of its previous ``history`` values.  ``jump`` times
that is a warning, ``critical_jump`` times critical; both name the matrices that jumped most
and, when the trainer sends ``lr``, what the learning rate did.  One detection per jump: the new
level becomes the history after ``history`` steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from agent.predict.base import Forecast, Predictor
from agent.predict.fit import median
from agent.predict.roles import matrix_rows
from sentinel_contract.typedconfig import option


@dataclass
class UpdateRatioConfig:
    enabled: bool = option(True, doc="Watch the update ratio ||dW||/||W|| of the weight matrices for a sudden jump.")
    jump: float = option(4.0, range=(1.0, 1e6), doc="Median update ratio this many times its recent median: a warning.")
    critical_jump: float = option(8.0, range=(1.0, 1e6), doc="... this many times: critical.")
    history: int = option(16, range=(2, 10_000), doc="Previous statistics steps whose median is the reference.")
    exclude: list[str] = option(
        ["bias", "norm", "ln_"],
        doc="From a trainer that sends no roles: rows whose name contains one of these are not matrices.",
    )


class UpdateRatio(Predictor):
    name = key = "update_ratio"
    Config = UpdateRatioConfig
    stat = "update_ratio"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self._past: deque[tuple[int, float, float | None]] = deque(maxlen=self.c.history)
        self._current: Forecast | None = None

    def wants(self, msg) -> bool:
        return self.stat in msg.layout.stats

    def update(self, msg, series):
        col = msg.matrix[:, msg.layout.stats.index(self.stat)].astype(np.float64)
        mask = matrix_rows(msg.layout, tuple(self.c.exclude)) & np.isfinite(col) & (col > 0)
        if mask.sum() < 2:
            return None
        now, lr, past = median(col[mask]), msg.scalar("lr"), self._past
        if past and msg.step <= past[-1][0]:
            past.clear()
        out = None
        if len(past) == past.maxlen:
            ref = median(np.array([v for _, v, _ in past]))
            ratio = now / ref if ref > 0 else math.inf
            if ratio >= self.c.jump:
                self._current = self._forecast(msg, col, mask, now, ref, ratio, lr)
                out = [self._current]
            elif self._current is not None:
                out, self._current = [], None
        past.append((msg.step, now, lr))
        return out

    def rewind(self, to_step: int) -> None:
        self._past.clear()
        self._current = None

    def _forecast(self, msg, col, mask, now, ref, ratio, lr) -> Forecast:
        c = self.c
        severity = "critical" if ratio >= c.critical_jump else "warning"
        rows = np.flatnonzero(mask)
        top = rows[np.argsort(-col[rows])[:3]]
        names = [msg.layout.tensors[i] for i in top]
        message = (f"update ratios jumped {ratio:.1f}× at step {msg.step}: median over {len(rows)} matrices "
                   f"{now:.3g}, was {ref:.3g}; largest {names[0]} {col[top[0]]:.3g}")  # fmt: skip
        lrs = [v for _, _, v in self._past if v is not None and math.isfinite(v) and v > 0]
        evidence = {"jump": ratio, "median_now": now, "median_before": ref, "matrices": int(len(rows)),
                    "largest": names, "jump_threshold": c.jump}  # fmt: skip
        if lr is not None and lrs and math.isfinite(lr):
            lr_before = median(np.array(lrs))
            message += f"; the learning rate went from {lr_before:.3g} to {lr:.3g} ({lr / lr_before:.2f}×)"
            evidence.update(lr=lr, lr_before=lr_before)
        steps = [s for s, _, _ in self._past] + [msg.step]
        values = [v for _, v, _ in self._past] + [now]
        evidence["curve"] = {"steps": steps, "values": values, "scale": "log", "slope": 0.0, "at_step": steps[-2],
                             "at_value": ref, "limit": ref * c.jump}  # fmt: skip
        risk = 1.0 if severity == "critical" else 0.5
        return Forecast(self.name, names[0], self.stat, now, msg.step, None, severity, risk, message, evidence)
