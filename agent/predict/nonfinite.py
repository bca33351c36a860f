"""NaN and ±Inf: a non-finite ``loss`` or ``grad_norm`` is a critical ``nonfinite`` detection at once,
with no warm-up (Megatron-LM treats it as fatal); a non-finite value in any other scalar or
per-tensor statistic is a ``nonfinite`` warning naming it.  One detection per episode: an episode
lasts while the value stays non-finite in the messages that carry it (a message without it, such
as the probes' own, neither ends nor repeats it).

Under torch.distributed rank 0 also sends the job-level ``loss_max`` (sentinel/rank_reduce.py): a
loss that is not finite on *any* rank makes it non-finite, and ``loss_max_rank`` names the first
such rank.  The loss episode then reads that value, and the detection names the rank, so a NaN on
rank 1 of a run where only rank 0 publishes is a critical ``nonfinite`` detection like rank 0's own."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.predict.base import Detection, Predictor
from sentinel_contract.protocol import StatsMessage
from sentinel_contract.typedconfig import option

PRIMARY = ("loss", "grad_norm")
#: job-level scalar (max over ranks) and the rank it came from, per primary scalar that has one
JOB_LEVEL = {"loss": ("loss_max", "loss_max_rank", "loss_nonfinite_ranks")}


@dataclass
class NonfiniteConfig:
    enabled: bool = option(True, doc="Report NaN/Inf in the loss, the gradient norm and every other statistic.")


class Nonfinite(Predictor):
    name = key = "nonfinite"
    Config = NonfiniteConfig
    kind = "event"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self._bad: set = set()  # what is non-finite now: "loss", "grad_norm", or ("*", layout) for the rest

    def wants(self, msg: StatsMessage) -> bool:
        return True

    def update(self, msg: StatsMessage, series) -> list[Detection]:
        out = []
        for name in PRIMARY:
            v, where, evidence = _primary(msg, name)
            if v is None:
                continue  # not in this message: its episode goes on
            if math.isfinite(v):
                self._bad.discard(name)
                continue
            if name not in self._bad:
                out.append(Detection(self.run, self.rank, msg.step, self.name, "critical", name, v,
                                     f"{name} is {v}{where} at step {msg.step}", evidence=evidence))  # fmt: skip
            self._bad.add(name)
        others = [
            n for n, v in zip(msg.layout.scalars, msg.scalars.tolist()) if n not in PRIMARY and not math.isfinite(v)
        ]
        if not np.isfinite(msg.matrix).all():
            rows, cols = np.nonzero(~np.isfinite(msg.matrix))
            others += [
                f"{msg.layout.tensors[r]}/{msg.layout.stats[c]}" for r, c in zip(rows[:5].tolist(), cols[:5].tolist())
            ]
        key = ("*", msg.layout)
        if not others:
            self._bad.discard(key)
            return out
        if key not in self._bad and not self._bad & set(PRIMARY) and not out:
            out.append(Detection(self.run, self.rank, msg.step, self.name, "warning", others[0], math.nan,
                                 f"non-finite statistics at step {msg.step}: {', '.join(others[:5])}",
                                 evidence={"names": others[:5]}))  # fmt: skip
        self._bad.add(key)
        return out

    def rewind(self, to_step: int) -> None:
        self._bad.clear()


def _primary(msg: StatsMessage, name: str) -> tuple[float | None, str, dict]:
    """(value, " on rank R" or "", evidence) of a primary scalar: the job-level one when it is not finite."""
    v = msg.scalar(name)
    if name not in JOB_LEVEL:
        return v, "", {"value": v}
    job_name, rank_name, count_name = JOB_LEVEL[name]
    job = msg.scalar(job_name)
    if job is None or math.isfinite(job):
        return v, "", {"value": v}
    rank, count = msg.scalar(rank_name), msg.scalar(count_name)
    rank = int(rank) if rank is not None and math.isfinite(rank) else None
    count = int(count) if count is not None and math.isfinite(count) else None
    where = "" if rank is None else f" on rank {rank}"
    if count is not None and count > 1:
        where += f" (non-finite on {count} ranks)"
    return job, where, {"value": job, "rank": rank, "nonfinite_ranks": count, "statistic": job_name}
