"""One Adam/AdamW update that carries WeSaR's gates and ε's scales, instead of converting around the step.

Why: with the user's optimizer doing the update, WeSaR must turn the module's W̄ into W before
the step and back after it, and scale every gradient: four extra passes over the weights and
two over the gradients (docs/optim.md, Cost).  The algebra needs none of them.  Keep W̄ = α·W
in the module and Adam's state for W; the gradient of W is f·ḡ with f = α·s (s: ε's scale),
and the step of W̄ is the step of W times α.  So a fused Adam kernel run on W̄ with

    grad_scale = 1/f,   lr_i = α·lr,   weight_decay_i = wd/α   (lr_i·wd_i = lr·wd)

leaves W̄ = α·W' and Adam's state exactly as the hook path leaves them.  The gates step first
(their gradients are complete before the update), so the kernel writes α'·W' directly:
learning rate α'·lr and a weight decay chosen so that 1 − lr_k·wd_k = (α'/α)(1 − lr·wd).
The clamp reads ‖W‖ = ‖W̄‖/α and rebuilds ΔW from the same state.  Every factor is a
per-tensor scalar, so the update costs torch's fused Adam pass plus WeSaR's dot ⟨ḡ, W̄⟩ and
the guard's gradient read.

Sharded parameters (FSDP2, tensor parallel): the kernel runs on each rank's shards of the
parameter, gradient and state; α, s and the clamp's factor are whole-tensor values, the same on
every rank (sentinel/optim/sharded.py), so the shards end as the unsharded update would leave them.

How the user's optimizer is kept: its ``param_groups`` (LR schedulers), its ``state`` layout
(``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``: a plain AdamW loads its
``state_dict``) and its ``step()`` (GradScaler, hooks) stay; sentinel's pre-step hook does
the update and sets the gradients aside, so the optimizer's own step finds nothing to do; the
post-step hook puts them back.  Refused, with the reason logged once (the hook path then
runs): optimizers other than torch.optim.Adam/AdamW, ``capturable``, ``differentiable``,
``fused=True`` (GradScaler then hands the optimizer scaled gradients and its found-inf flag,
which this path does not take yet: use foreach), and ``stats.update: copy`` (a snapshot of W̄
would need its own conversion).  Statistics are taken as on the hook path, in W's units: ‖W‖ =
‖W̄‖/α before the update, the gradient of W = α·ḡ, and the update rebuilt from Adam's state
with W' = (what the module holds)/α' (sentinel/stats.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from sentinel.adam import is_adam
from sentinel.collectives import local
from sentinel.optim.base import StepContext

log = logging.getLogger("sentinel")


def refusal(optimizer: torch.optim.Optimizer, stats_mode: str | None = None) -> str | None:
    """Why the fused step cannot run for this optimizer (None: it can); ``stats_mode``: stats.update in force."""
    if not is_adam(optimizer):
        return f"it needs torch.optim.Adam or AdamW, not {type(optimizer).__name__}"
    if stats_mode == "copy":
        return "stats.update is 'copy' (use 'reconstruct', the default for Adam/AdamW)"
    for g in optimizer.param_groups:
        for key in ("capturable", "differentiable", "fused"):
            if g.get(key, False):
                return f"the optimizer was built with {key}=True"
    return None


class FusedStep:
    """Performs the Adam/AdamW update of every parameter with a gradient, with per-tensor α and s."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[Tensor], group_of: list[int]):
        self.optimizer, self.params, self.group_of = optimizer, params, group_of
        self._held: list[tuple[Tensor, Tensor]] = []
        self.done: set[int] = set()  # tensors updated in the current step

    @torch.no_grad()
    def step(self, ctx: StepContext, alpha: dict[int, Any], new_alpha: dict[int, Any]) -> None:
        """Update every parameter that has a gradient; ``ctx.grad_factor`` holds f = α·s per tensor.

        ``alpha``/``new_alpha``: each gated tensor's gate before and after the gates' step.  The
        module must end holding α'·W' = (α'/α)(1 − lr·wd)·W̄ − α'·lr·u; with the decoupled
        kernel that is learning rate α'·lr and a weight decay with 1 − lr_k·wd_k equal to
        (α'/α)(1 − lr·wd), so the gate's change costs no pass of its own.  Adam's L2 weight
        decay (and lr = 0) cannot carry it: there the kernel runs with α and W̄ is multiplied by α'/α.
        """
        factors = ctx.grad_factor or {}
        state = self.optimizer.state
        self.done: set[int] = set()
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"fused Adam step: sparse gradient for {ctx.names[i]}")
            group = self.optimizer.param_groups[self.group_of[i]]
            st = state[p]
            if "step" not in st:
                self._init_state(st, p, group)
            a, a_new = float(alpha.get(i, 1.0)), float(new_alpha.get(i, 1.0))
            f = factors.get(i, 1.0)
            lr = float(group["lr"])
            wd = float(group["weight_decay"])
            beta1, beta2 = group["betas"]
            decoupled = group.get("decoupled_weight_decay", False) or type(self.optimizer) is torch.optim.AdamW
            after = 1.0
            if a_new == a:
                lr_k, wd_k = lr * a, wd / a
            elif (decoupled or wd == 0.0) and lr != 0.0:
                decoupled = True  # Adam without weight decay is AdamW without it
                lr_k = lr * a_new
                wd_k = (1.0 - a_new / a * (1.0 - lr * wd)) / lr_k
            else:
                lr_k, wd_k, after = lr * a, wd / a, a_new / a
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            step_t = st["step"]
            step_t += 1
            steps = [step_t if step_t.device == local(p).device else step_t.to(local(p).device)]
            scale = None
            if not (isinstance(f, float) and f == 1.0):
                scale = (1.0 / torch.as_tensor(f, dtype=torch.float64)).to(p.device, torch.float32).reshape(())
            kernel(  # on this rank's shards: every factor is a per-tensor scalar, the same on every rank
                [local(p)],
                [local(g)],
                [local(st["exp_avg"])],
                [local(st["exp_avg_sq"])],
                [local(st["max_exp_avg_sq"])] if group.get("amsgrad", False) else [],
                steps,
                lr=lr_k,
                beta1=float(beta1),
                beta2=float(beta2),
                weight_decay=wd_k,
                eps=float(group["eps"]),
                amsgrad=bool(group.get("amsgrad", False)),
                maximize=bool(group.get("maximize", False)),
                grad_scale=scale,
                found_inf=None,
            )
            if after != 1.0:
                local(p).mul_(after)
            self.done.add(i)
        self._hold(ctx)

    def _init_state(self, st: dict, p: Tensor, group: dict) -> None:
        """The state torch's Adam would create (same keys, dtypes and devices as its own first step)."""
        on_device = group.get("fused", False) or group.get("capturable", False)
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        st["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _hold(self, ctx: StepContext) -> None:
        """Set the gradients aside so the optimizer's own step, which runs next, updates nothing."""
        self._held = [(p, p.grad) for p in self.params if p.grad is not None]
        for p, _ in self._held:
            p.grad = None

    def restore(self) -> None:
        """Give the gradients back after the optimizer's step (the loop may still read or zero them)."""
        for p, g in self._held:
            p.grad = g
        self._held = []
