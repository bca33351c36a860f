"""Whole-tensor sums for the transforms when parameters are sharded (FSDP2, tensor parallel: DTensor).

Why: the guard's global gradient norm, WeSaR's gate gradients ⟨ḡ, W̄⟩, ε's RMS(g) and RMS(√v̂)
and the clamp's ‖W‖ and ‖ΔW‖ are sums over a tensor's elements.  Each rank holds a shard, so
its own sums are partial; taken as they are, every rank would decide on different numbers
(one skipping a step the others take, ε tuned per shard).  They all add up across shards, so
they are gathered the way the statistics gather theirs (sentinel/collectives.py ShardSum).

How: before the transforms act (sentinel/optim/chain.py), each says which sums it needs this
step (``sum_keys``: decided from state that is the same on every rank) and computes them over
its local shards (``shard_sums``).  They are packed into one (tensors x keys) float64 tensor and
all-reduced **once**, and each transform reads the whole tensors' values from ``ctx.sums``.
Everything is taken from the gradients, weights and Adam state as the step finds them; each
transform corrects for the scalar factors applied after that point (the guard's clip, WeSaR's
α), so the values equal those of the same model unsharded.  After the step only the clamp may
need ‖ΔW‖: it reads the statistics' reduced ``update_l2`` on statistics steps, and otherwise
reduces it itself, only when its bound does not rule out exceeding a maximum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sentinel.collectives import DTensor, ShardSum, local

log = logging.getLogger("sentinel")


def is_sharded(params: Sequence[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(p, DTensor) for p in params)


def shard_sum(params: Sequence[Tensor]) -> ShardSum | None:
    """The reduction ``params`` need (None: every rank holds whole tensors). Raises where none is exact."""
    return ShardSum.for_params(params) if is_sharded(params) else None


def refusal(params: Sequence[Tensor]) -> str | None:
    """Why the transforms cannot be exact on these parameters (None: they can)."""
    try:
        shard_sum(params)
    except Exception as exc:
        return str(exc)
    return None


def sq_norms(tensors: list[Tensor]) -> list[Tensor]:
    """‖x‖² per tensor over this rank's elements, in float64 (they add up across shards)."""
    if not tensors:
        return []
    return [n.double().square() for n in torch._foreach_norm([local(t) for t in tensors])]


def dots(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """⟨a, b⟩ per pair over this rank's elements, in float64."""
    return [torch.dot(local(x).reshape(-1), local(y).reshape(-1)).double() for x, y in zip(a, b)]


class StepSums:
    """One step's packed reduction: keys x tensors of partial sums in, the whole tensors' sums out."""

    def __init__(self, shards: ShardSum, n: int, device: torch.device):
        self.shards, self.n, self.device = shards, n, device
        self.values: dict[str, Tensor] = {}
        self.failed = 0

    def reduce(self, parts: dict[str, dict[int, Tensor] | None]) -> None:
        """``parts``: per key, this rank's partial sum of each tensor it covers (None: this rank failed)."""
        keys = list(parts)
        failed = any(v is None for v in parts.values())
        mat = torch.zeros(self.n, len(keys), dtype=torch.float64, device=self.device)
        for k, key in enumerate(keys):
            part = parts[key]
            if part is None:
                mat[:, k] = float("nan")
            elif part:
                idx = list(part)
                mat[idx, k] = torch.stack([part[i].reshape(()).to(mat) for i in idx])
        out = self.shards(mat, failed=failed)
        self.failed = self.shards.failures()
        self.values = {key: out[:, k] for k, key in enumerate(keys)}

    def __getitem__(self, key: str) -> Tensor:
        return self.values[key]


def collect(transforms: dict[str, Any], order: Sequence[str], ctx: Any, shards: ShardSum) -> StepSums | None:
    """The transforms' sums for this step, reduced in one collective; None when none needs any.

    A transform whose local sums fail still takes part, with NaN and the failure flag; every
    rank then sees ``failed`` > 0 and the chain skips that update on all of them.
    """
    parts: dict[str, dict[int, Tensor] | None] = {}
    for name in order:
        t = transforms.get(name)
        if t is None:
            continue
        keys = t.sum_keys(ctx)
        if not keys:
            continue
        try:
            got = t.shard_sums(ctx)
            for key in keys:
                parts[key] = got.get(key, {})
        except Exception:
            log.exception("sentinel: %s failed computing its shard sums at step %d on this rank", name, ctx.step)
            for key in keys:
                parts[key] = None
    if not parts:
        return None
    sums = StepSums(shards, len(ctx.params), local(ctx.params[0]).device)
    sums.reduce(parts)
    return sums


def shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full`` (the whole tensor, the same on every rank) laid out as DTensor ``like``."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
