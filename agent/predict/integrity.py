"""Weights that changed outside the optimizer: a silent corruption (a bit flip, a bad write, a
kernel bug) shows as a parameter norm that moved more than the optimizer's own update allows.

By the triangle inequality |‖W_{t+1}‖ − ‖W_t‖| ≤ ‖W_{t+1} − W_t‖ = ``update_l2`` at step t, so
on consecutive statistics steps the trainer's ``param_l2`` (before each step) may move by at most
the previous step's ``update_l2``.  A move beyond that by more than ``tolerance`` × ‖W‖ (float32
rounding of the norms) means something else wrote the tensor.  This has no threshold to fit: on a
clean run it never fires (a skipped update has ``update_l2`` 0 and leaves the norm alone), and the
first step that uses a corrupted weight is the step it is reported (once per run of such steps).  Critical when the unexplained
move is at least ``critical_fraction`` of ‖W‖.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.predict.base import Detection, Predictor, severity_rank
from sentinel_contract.typedconfig import option

NEEDS = ("param_l2", "update_l2")


@dataclass
class IntegrityConfig:
    enabled: bool = option(True, doc="Report weights whose norm moved more than their own update explains.")
    tolerance: float = option(1e-4, range=(0.0, 1.0), doc="Unexplained move, as a fraction of ||W||, that is ignored.")
    critical_fraction: float = option(
        0.01, range=(0.0, 1e6), doc="Unexplained move (fraction of ||W||) that is critical."
    )


class Integrity(Predictor):
    name = "param_integrity"
    key = "integrity"
    Config = IntegrityConfig
    kind = "event"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self._last: tuple[int, tuple[str, ...], np.ndarray, np.ndarray] | None = None
        self._episode: str | None = None  # severity of the current run of steps with unexplained moves

    def wants(self, msg) -> bool:
        return all(n in msg.layout.stats for n in NEEDS)

    def update(self, msg, series) -> list[Detection]:
        stats = msg.layout.stats
        w = msg.matrix[:, stats.index("param_l2")].astype(np.float64)
        u = msg.matrix[:, stats.index("update_l2")].astype(np.float64)
        last, self._last = self._last, (msg.step, msg.layout.tensors, w, u)
        if last is None or last[0] != msg.step - 1 or last[1] != msg.layout.tensors:
            return []
        w0, u0 = last[2], last[3]
        with np.errstate(invalid="ignore"):
            excess = np.abs(w - w0) - u0 - self.c.tolerance * np.maximum(w, w0)
        bad = np.isfinite(excess) & (excess > 0)
        if not bad.any():
            self._episode = None
            return []
        frac = np.where(bad, excess / np.maximum(np.maximum(w, w0), 1e-30), 0.0)
        r = int(frac.argmax())
        name = msg.layout.tensors[r]
        severity = "critical" if frac[r] >= self.c.critical_fraction else "warning"
        if self._episode is not None and severity_rank(severity) <= severity_rank(self._episode):
            return []
        self._episode = severity
        message = (f"{name} changed outside the optimizer at step {msg.step}: ||W|| went from {w0[r]:.6g} to "
                   f"{w[r]:.6g}, the update could move it by {u0[r]:.3g} at most")  # fmt: skip
        n = int(bad.sum())
        if n > 1:
            message += f" ({n} tensors)"
        evidence = {"param_l2_before": w0[r], "param_l2": w[r], "update_l2": u0[r], "unexplained_fraction": frac[r],
                    "tensors": [msg.layout.tensors[i] for i in np.flatnonzero(bad)[:16]]}  # fmt: skip
        return [Detection(self.run, self.rank, msg.step, self.name, severity, "param_l2", float(w[r]), message,
                          layer=name, evidence=evidence)]  # fmt: skip

    def rewind(self, to_step: int) -> None:
        self._last, self._episode = None, None
