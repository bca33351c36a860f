"""Job-level scalars: every rank's loss, step time and error count, reduced once per step.

Why: with ``publish.ranks: zero`` only rank 0 talks to the agent, so a NaN loss, a slow step or a
failed statistics computation on rank 1..N-1 would be invisible; with ``publish.ranks: all`` it
would be visible at the price of a series per rank.  Instead every rank writes its three values
into its own row of a ``world_size x 4`` table (the rest zeros) and the table is all-reduced
(``SUM``) once per ``observe()``: afterwards every rank holds every rank's values exactly, NaN and
Inf included (a NaN plus the other ranks' zeros stays NaN, in its own row), and rank 0 publishes
the job-level minimum, mean, maximum and the rank of the maximum.  The arg-max of the loss is the
first rank whose loss is not finite, when there is one, so the agent's NaN rule can name it.

The table lives on the parameters' device: under NCCL the all-reduce is enqueued on the stream
and its result leaves the device with the step's other scalars (sentinel/publish.py
``HostTransfer``), so there is no host synchronisation; on CPU it runs on sentinel's gloo group.
``world_size x 4`` float32 values: 16 KB at 1,024 ranks.  A single process has no table and no
collective.  Every rank must call it at every ``observe()`` (they do: the reduction runs before
the publisher is consulted, on every rank, whatever ``publish.ranks`` says).

The step time reduced here is each rank's time *outside* ``observe()``: from the moment its
previous ``observe()`` returned to the moment it calls the next one.  Ranks wait for each other
inside sentinel's collectives, so the period from one ``observe()`` to the next is the same on
every rank of a synchronous job; the time outside them is not, and the rank the others waited
for has the largest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

import sentinel.collectives as collectives
from sentinel_contract.protocol import JOB_SCALARS

log = logging.getLogger("sentinel")
COLUMNS = ("loss", "loss_given", "step_seconds", "errors")
SCALARS = JOB_SCALARS  # what rank 0 publishes, in order (docs/metrics.md, "Job-level aggregates")


class RankReduce:
    """One all-reduce per step of (loss, step time, error count) over every rank."""

    def __init__(self, device: torch.device, rank: int, world: int, group: Any):
        self.device, self.rank, self.world, self.group = device, rank, world, group
        self.since = time.perf_counter()  # the first step's time outside observe() runs from attach
        self.failed = False
        self.failed_loss = False  # logged once

    @classmethod
    def create(cls, params: list[torch.Tensor]) -> RankReduce | None:
        """The reduction for this process group, or None in a single process.

        A collective call on a fresh group: every rank calls this at ``attach``, in the same order.
        """
        if not collectives.active() or collectives.world_size() < 2:
            return None
        device = collectives.local(params[0]).device if params else torch.device("cpu")
        if device.type != "cuda" or "nccl" not in str(dist.get_backend()).lower():
            device = torch.device("cpu")  # gloo: host tensors (a CUDA loss is then copied to the host)
        group = None if device.type == "cuda" else collectives.cpu_group()
        return cls(device, collectives.rank(), collectives.world_size(), group)

    def left(self) -> None:
        """``observe()`` is returning: the next step's time outside it starts now."""
        self.since = time.perf_counter()

    def _row(self, loss: Any, seconds: float, errors: int) -> torch.Tensor:
        """This rank's row; a loss that cannot be read counts as not given (not as NaN: that would
        be a divergence), so the rank still joins."""
        dev = self.device
        given = 0.0 if loss is None else 1.0
        try:
            value = torch.zeros((), device=dev) if loss is None else torch.as_tensor(loss)
            value = value.detach().to(device=dev, dtype=torch.float32).reshape(())
        except Exception:
            if not self.failed_loss:
                log.exception("sentinel: the loss given to observe() is not one number; left out of the job's loss")
            self.failed_loss, given = True, 0.0
            value = torch.zeros((), device=dev)
        rest = torch.tensor([given, seconds, float(errors)], dtype=torch.float32).to(dev, non_blocking=True)
        return torch.cat([value.reshape(1), rest])

    def __call__(self, loss: Any, errors: int) -> dict[str, torch.Tensor]:
        """The job-level scalars of this step, as 0-d tensors on the device (the same on every rank)."""
        if self.failed:
            return {}
        seconds = time.perf_counter() - self.since
        table = torch.zeros((self.world, len(COLUMNS)), dtype=torch.float32, device=self.device)
        try:
            table[self.rank] = self._row(loss, seconds, errors)
        except Exception:  # never leave the other ranks waiting in the all-reduce
            log.exception("sentinel: building this rank's job-level row failed; joining with NaN")
            table[self.rank] = float("nan")
        try:
            dist.all_reduce(table, op=dist.ReduceOp.SUM, group=self.group)
        except Exception:
            self.failed = True
            log.exception("sentinel: the job-level all-reduce failed; job-level scalars are off from now on")
            return {}
        return job_scalars(table, loss is not None)


def job_scalars(table: torch.Tensor, with_loss: bool = True) -> dict[str, torch.Tensor]:
    """Min, mean, max and arg-max rank of the reduced ``table`` (ranks x COLUMNS), on its device."""
    loss, given, seconds, errors = table.unbind(1)
    out: dict[str, torch.Tensor] = {}
    if with_loss:
        present = given > 0
        bad = present & ~torch.isfinite(loss)
        key = torch.where(bad, torch.inf, torch.where(present, loss, -torch.inf))
        n = present.sum().clamp(min=1).to(loss.dtype)
        out["loss_min"] = torch.where(present, loss, torch.inf).amin()  # NaN propagates: amin keeps it
        out["loss_mean"] = torch.where(present, loss, 0.0).sum() / n
        out["loss_max"] = torch.where(present, loss, -torch.inf).amax()
        out["loss_max_rank"] = key.argmax()  # the first non-finite rank, else the largest loss
        out["loss_nonfinite_ranks"] = bad.sum()
    out["step_seconds_min"] = seconds.amin()
    out["step_seconds_mean"] = seconds.mean()
    out["step_seconds_max"] = seconds.amax()
    out["step_seconds_max_rank"] = seconds.argmax()
    out["errors_max"] = errors.amax()
    out["errors_max_rank"] = errors.argmax()
    return out
