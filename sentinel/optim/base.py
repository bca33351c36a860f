"""The contract every optimizer transform follows (the optax idea, on torch step hooks).

A transform acts around the user's own ``optimizer.step()``: ``before_step`` runs in the
optimizer's pre-step hook, ``after_step`` in its post-step hook.  Its state lives in its
``state_dict`` (saved in ``sn.state_dict()``) or in the optimizer itself, so a resumed run
continues exactly.  It may add per-tensor columns and scalars to what sentinel publishes,
and it records every action it takes, with its evidence, in ``ctx.events``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sentinel.collectives import local


@dataclass
class StepContext:
    """What the transforms of one optimizer step share."""

    step: int
    params: list[Tensor]
    names: tuple[str, ...]
    group_of: list[int]
    skip: bool = False
    grad_scale: list | None = None  # per tensor, set by eps: gradients and Adam state are in units × scale
    events: list[dict[str, Any]] = field(default_factory=list)
    grad_factor: dict[int, Any] | None = None  # pending gradient multipliers, by tensor; None: apply at once
    applied: dict[int, Any] = field(default_factory=dict)  # multipliers applied so far this step, by tensor
    pre_clip: Any = None  # sentinel.gradnorms.PreClip: the gradient norms before the user's clipping
    sums: Any = None  # sharded parameters: the whole tensors' sums of this step (sentinel/optim/sharded.py)
    guard_scale: float = 1.0  # what the guard's clip multiplied every gradient by (after ``sums`` were taken)
    update_l2: Any = None  # sharded: ‖ΔW‖ per tensor, whole tensors, when the statistics measured it this step


class Transform:
    """Base class: a transform that does nothing. Subclasses override what they need."""

    name = "transform"

    def before_step(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def sum_keys(self, ctx: StepContext) -> tuple[str, ...]:
        """Sharded parameters: the whole-tensor sums this step needs (the same on every rank)."""
        return ()

    def shard_sums(self, ctx: StepContext) -> dict[str, dict[int, Tensor]]:
        """This rank's partial sums for ``sum_keys``, per key and tensor index (sentinel/optim/sharded.py)."""
        return {}

    def columns(self) -> dict[str, Tensor]:
        """Per-tensor statistics aligned with ``ctx.params`` (published on statistics steps)."""
        return {}

    def scalars(self) -> dict[str, float | Tensor]:
        """Scalars published every step (counters, current settings)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def host_scalars(t: Tensor) -> list:
    """The elements of a small vector as scalars for foreach ops: floats on the host, 0-dim tensors on a device.

    On the CPU, reading them costs nothing and lets the foreach op take its scalar-list
    path instead of broadcasting a 0-dim tensor per tensor, and lets a factor of exactly 1
    be skipped; on a device, 0-dim tensors avoid a host sync.
    """
    return t.tolist() if t.device.type == "cpu" else list(t.unbind())


def scale_grads(ctx: StepContext, index: list[int], factors: list) -> None:
    """Multiply the gradient of ``ctx.params[i]`` by ``factors[k]`` for ``i = index[k]``.

    When the chain collects factors (``ctx.grad_factor`` is a dict), they are merged per
    tensor and applied in one pass (chain.py), so WeSaR's α and ε's scale cost one read and
    one write of the gradients, not two.  A factor of exactly 1.0 is skipped.
    """
    pairs = [
        (i, f)
        for i, f in zip(index, factors)
        if ctx.params[i].grad is not None and not (isinstance(f, float) and f == 1.0)
    ]
    if not pairs:
        return
    if ctx.grad_factor is None:
        apply_grad_factors(ctx.params, dict(pairs))
        return
    merge_factors(ctx.grad_factor, dict(pairs))


def merge_factors(into: dict[int, Any], factors: dict[int, Any]) -> dict[int, Any]:
    """Multiply ``factors`` into ``into`` per tensor (in place); returns ``into``."""
    for i, f in factors.items():
        into[i] = into[i] * f if i in into else f
    return into


def apply_grad_factors(params: list[Tensor], factors: dict[int, Any]) -> None:
    """One foreach multiply of the gradients by host factors, one by device factors."""
    for kind in (float, Tensor):
        idx = [i for i, f in factors.items() if isinstance(f, kind) and params[i].grad is not None]
        if idx:
            torch._foreach_mul_([local(params[i].grad) for i in idx], [factors[i] for i in idx])


def optimizer_params(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[int]]:
    """The trainable parameters of ``optimizer`` in group order, and the group of each."""
    params, group_of = [], []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                params.append(p)
                group_of.append(g)
    return params, group_of
