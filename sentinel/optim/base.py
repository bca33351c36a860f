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


class Transform:
    """Base class: a transform that does nothing. Subclasses override what they need."""

    name = "transform"

    def before_step(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

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


def optimizer_params(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[int]]:
    """The trainable parameters of ``optimizer`` in group order, and the group of each."""
    params, group_of = [], []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                params.append(p)
                group_of.append(g)
    return params, group_of
