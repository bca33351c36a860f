"""Update-ratio clamp: no matrix may move by more than its role's share of itself in one step.

Why: before a spike the update ratio ‖ΔW‖/‖W‖ of the small matrices (W_d, W_o) runs ahead
of the others (WeSaR, papers/001, §3.3 and Fig. 1).  The clamp bounds it per role: after the
step, a matrix whose ratio exceeds its maximum is moved back along its own update,
W ← W_before + c·ΔW with c = max/ratio, so its ratio equals the maximum exactly and its
direction is kept.  Adam's state is left as the optimizer wrote it.

Memory: for Adam and AdamW ΔW is rebuilt from the optimizer state after the step
(sentinel/adam.py), in chunks of at most ``chunk_elements`` elements, so no copy of the
parameters is kept; for other optimizers the clamped matrices are copied before the step.

Cost: Adam's step is bounded per element, |m̂/√v̂| ≤ B = (1-β1)/√((1-β2)(1-β1²/β2)) (Cauchy-
Schwarz over the moving averages, for β1² < β2), so with s = lr/(1-lr·wd)
    ‖ΔW‖ ≤ s·(wd·(‖W‖ + lr·B·√n) + B·√n).
Only matrices whose bound exceeds their maximum are rebuilt exactly; in ordinary training
that is none.  ‖W‖ itself is read only when needed: after an unclamped step
‖W_new‖ ≥ (1 − lr·wd)·‖W‖ − lr·B·√n, so a lower bound on ‖W‖ is carried from step to step,
and while the bound check holds at that lower bound (it then holds at the true norm, see
``_proven``) and the tensor's version counter shows no other write, the step reads nothing.
The exact norm is read again when the lower bound has decayed too far (for a matrix far from
its maximum, every few dozen steps), after any in-place write to the parameter, after
``sn.load_state_dict`` and after a rebuilt update.

Sharded parameters (FSDP2, tensor parallel): ‖W‖ is read every step, as a shard sum in the
transforms' one all-reduce before the step; ‖ΔW‖ comes from the statistics' all-reduce on
their steps, else from one all-reduce of the clamp's own, only when a matrix may exceed its
maximum (sentinel/optim/sharded.py).  Every rank scales its shard of ΔW by the same factor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sentinel.adam import adam_chunks, is_adam
from sentinel.collectives import local
from sentinel.optim.base import StepContext, Transform
from sentinel.optim.sharded import shard_sum, sq_norms

log = logging.getLogger("sentinel")


class Clamp(Transform):
    name = "clamp"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        group_of: list[int],
        names: tuple[str, ...],
        roles: dict[str, str],
        *,
        max_ratio: dict[str, float],
        default: float | None = None,
        chunk_elements: int = 1 << 25,
    ):
        self.optimizer, self.params, self.group_of = optimizer, params, group_of
        self.chunk_elements = chunk_elements
        limits = {}
        for i, (p, name) in enumerate(zip(params, names)):
            limit = max_ratio.get(roles.get(name, ""), default)
            if p.dim() >= 2 and limit is not None:
                limits[i] = limit
        if not limits:
            raise ValueError("update-ratio clamp: no matrix has a maximum (set clamp.max_ratio per role or default)")
        self.index = sorted(limits)
        self.limit = {i: limits[i] for i in self.index}
        self.names = names
        self.adam = is_adam(optimizer)
        device = params[0].device
        self.factor = torch.ones(len(params), device=device)
        self.events = torch.zeros((), device=device, dtype=torch.int64)
        self._before_norm: dict[int, Tensor] = {}
        self._before: dict[int, Tensor] = {}
        self._active: list[int] = []
        self._norm_host: dict[int, float] = {}
        self._lower: dict[int, float] = {}  # ‖W‖ ≥ this while the tensor's version is _version[i]
        self._version: dict[int, int] = {}
        self.units_of: Any = None  # fused step: callable giving {index: α}, the module holding α·W
        self.units_after_of: Any = None  # the same after the update (α' once the gates have stepped)
        self._units: dict[int, Any] = {}
        self.alpha_of: Any = None  # WeSaR on: callable giving {index: α} in force (the module held α·W at the sums)
        self.shards = shard_sum(params)  # sharded parameters: ‖W‖ and ‖ΔW‖ summed over the shards (sharded.py)

    def sum_keys(self, ctx: StepContext) -> tuple[str, ...]:
        return ("clamp.w",) if self.shards is not None else ()

    def shard_sums(self, ctx: StepContext) -> dict[str, dict[int, Tensor]]:
        """‖W‖² of every bounded matrix with a gradient, over this rank's shard (as the module holds it)."""
        active = [i for i in self.index if self.params[i].grad is not None]
        return {"clamp.w": dict(zip(active, sq_norms([self.params[i].detach() for i in active])))}

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        active = [i for i in self.index if self.params[i].grad is not None]
        self._active = active
        if self.shards is not None:
            return self._before_sharded(ctx, active)
        need = [i for i in active if not self._proven(i)] if self.adam else active
        norms = torch._foreach_norm([self.params[i] for i in need]) if need else []
        self._units = self.units_of() if self.units_of is not None else {}
        if self._units:
            norms = [n / self._units[i] if i in self._units else n for i, n in zip(need, norms)]
        self._before_norm = dict(zip(need, norms))
        if not self.adam:
            self._before = {i: self.params[i].detach().clone() for i in active}

    def _before_sharded(self, ctx: StepContext, active: list[int]) -> None:
        """The whole matrices' ‖W‖, read every step (a version counter is no proof the same on every rank)."""
        alpha = self.alpha_of() if self.alpha_of is not None else {}
        summed = ctx.sums["clamp.w"]
        self._before_norm = {i: summed[i].sqrt() / alpha[i] if i in alpha else summed[i].sqrt() for i in active}
        self._units = self.units_of() if self.units_of is not None else {}
        if not self.adam:
            self._before = {i: local(self.params[i]).detach().clone() for i in active}

    def _terms(self, i: int) -> tuple[float, float, float | None]:
        """(lr, decoupled wd, B) of matrix i's group; B is None where Adam's step has no such bound."""
        group = self.optimizer.param_groups[self.group_of[i]]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        wd = float(group["weight_decay"]) if group.get("decoupled_weight_decay", False) else 0.0
        if beta1 * beta1 >= beta2:
            return lr, wd, None
        return lr, wd, (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1 * beta1 / beta2))

    def _bound(self, i: int, w: float, lr: float, wd: float, b: float) -> float:
        """The most ‖ΔW‖ of matrix i can be in this step, for ‖W‖ = w."""
        root_n = math.sqrt(self.params[i].numel())
        return lr / (1 - lr * wd) * (wd * (w + lr * b * root_n) + b * root_n)

    def _proven(self, i: int) -> bool:
        """Whether the lower bound on ‖W‖ kept from earlier steps already rules out exceeding the maximum.

        bound(w) − max·w has slope s·wd − max (s = lr/(1 − lr·wd)), so where s·wd ≤ max it falls
        with w: holding at the lower bound, it holds at the true ‖W‖, and the norm need not be read.
        """
        lower = self._lower.get(i)
        version = getattr(self.params[i], "_version", None)
        if lower is None or lower <= 0 or version is None or version != self._version.get(i):
            return False
        lr, wd, b = self._terms(i)
        if b is None or lr * wd >= 1 or lr / (1 - lr * wd) * wd > self.limit[i]:
            return False
        return self._bound(i, lower, lr, wd, b) <= self.limit[i] * lower

    def _keep_lower_bounds(self, exact: list[int]) -> None:
        """Carry ‖W‖ ≥ lower through the step just taken, for the matrices the optimizer moved unclamped.

        W_new = (1 − lr·wd)·W − lr·m̂/(√v̂ + ε) with |m̂/√v̂| ≤ B per element, so
        ‖W_new‖ ≥ (1 − lr·wd)·‖W‖ − lr·B·√n.  The bound holds while the tensor's version
        counter is unchanged (WeSaR's W ↔ W̄ round trip works on ``.data`` and the relative
        margin covers its rounding); an in-place write to the parameter, a restore through
        ``sn.load_state_dict`` or a rebuilt (possibly clamped) update starts from an exact norm again.
        """
        skip = set(exact)
        for i in self._active:
            w = self._norm_host[i] if i in self._before_norm else self._lower.get(i)
            lr, wd, b = self._terms(i)
            if i in skip or w is None or b is None:
                self._lower.pop(i, None)
                continue
            self._lower[i] = ((1 - lr * wd) * w - lr * b * math.sqrt(self.params[i].numel())) * (1 - 1e-4)
            self._version[i] = getattr(self.params[i], "_version", None)

    def _may_exceed(self, active: list[int]) -> list[int]:
        """The matrices whose update-ratio bound does not rule out exceeding their maximum."""
        self._norm_host = {}
        if not self.adam or not active:
            return active
        norms = torch.stack([self._before_norm[i] for i in active]).float().tolist()
        self._norm_host = dict(zip(active, norms))
        out = []
        for i, w in zip(active, norms):
            lr, wd, b = self._terms(i)
            if w <= 0 or b is None or self._bound(i, w, lr, wd, b) > self.limit[i] * w:
                out.append(i)
        return out

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        self.factor.fill_(1.0)
        if self.shards is not None:
            return self._after_sharded(ctx)
        active = self._may_exceed(list(self._before_norm))
        if self.units_after_of is not None:
            self._units = self.units_after_of()
        if self.adam:
            for c in adam_chunks(self.optimizer, self.params, self.group_of, active, self.chunk_elements):
                if self._units:  # the module holds α·W: rebuild ΔW of W
                    c.param_scale = [1.0 / float(self._units.get(i, 1.0)) for i in c.index]
                self._apply(ctx, c.index, c.neg_update(c.sqrt_v()))
            self._keep_lower_bounds(active)
        elif active:
            before, self._before = self._before, {}
            neg = [before[i] - self.params[i] for i in active]
            self._apply(ctx, active, neg, before)

    def _neg_updates(self, index: list[int]) -> Iterator[tuple[list[int], list[Tensor]]]:
        """-ΔW of this rank's shards of matrices ``index``, in chunks (rebuilt from Adam's state, or the copy)."""
        if self.adam:
            for c in adam_chunks(self.optimizer, self.params, self.group_of, index, self.chunk_elements):
                if self._units:  # the module holds α·W: rebuild ΔW of W
                    c.param_scale = [1.0 / float(self._units.get(i, 1.0)) for i in c.index]
                yield c.index, c.neg_update(c.sqrt_v())
        elif index:
            yield index, [self._before[i] - local(self.params[i]) for i in index]

    def _after_sharded(self, ctx: StepContext) -> None:
        """The clamp on whole matrices: their ‖ΔW‖ from the statistics when they measured it, else one all-reduce.

        Which matrices may exceed follows from the reduced ‖W‖, so every rank reduces (or not) alike.
        """
        active = self._may_exceed(list(self._before_norm))
        if self.units_after_of is not None:
            self._units = self.units_after_of()
        if not active:
            self._before = {}
            return
        if ctx.update_l2 is not None:
            norms = ctx.update_l2[active].double()
        else:
            part = torch.zeros(len(self.params), 1, dtype=torch.float64, device=self.factor.device)
            for index, neg in self._neg_updates(active):
                part[index, 0] = torch.stack(sq_norms(neg)).to(part)
            norms = self.shards(part)[active, 0].sqrt()
        w_norm = torch.stack([self._before_norm[i] for i in active]).to(norms)
        limit = torch.tensor([self.limit[i] for i in active], dtype=norms.dtype, device=norms.device)
        ratio = torch.where(w_norm > 0, norms / w_norm, torch.zeros_like(norms))
        factor = torch.where(ratio > limit, limit / ratio, torch.ones_like(ratio))
        self.factor[active] = factor.to(self.factor)
        over = factor < 1
        self.events += over.sum()
        on_host = self.factor.device.type == "cpu"
        pick = [active[k] for k in over.nonzero().flatten().tolist()] if on_host else active
        c_of = dict(zip(active, factor.unbind()))
        for index, neg in self._neg_updates(pick):
            for i, d in zip(index, neg):
                p, c = local(self.params[i]), c_of[i]
                if not self.adam:  # W_before + c·ΔW, exact where the copy exists
                    p.copy_(torch.lerp(self._before[i], p, c.to(p)))
                else:
                    p.add_(d * ((1 - c) * float(self._units.get(i, 1.0))).to(d))
                if on_host:
                    k = active.index(i)
                    evidence = {"param": self.names[i], "ratio": float(ratio[k]), "max": self.limit[i]}
                    ctx.events.append({"action": "clamp", "step": ctx.step, **evidence})
                    log.info("sentinel clamp: step %d %s", ctx.step, evidence)
        self._before = {}

    def _apply(
        self, ctx: StepContext, index: list[int], neg_update: list[Tensor], before: dict[int, Tensor] | None = None
    ) -> None:
        norms = torch.stack(torch._foreach_norm(neg_update)).float()
        w_norm = torch.stack([self._before_norm[i] for i in index]).float()
        limit = torch.tensor([self.limit[i] for i in index], device=norms.device)
        ratio = torch.where(w_norm > 0, norms / w_norm, torch.zeros_like(norms))
        factor = torch.where(ratio > limit, limit / ratio, torch.ones_like(ratio))
        self.factor[index] = factor
        over = factor < 1
        self.events += over.sum()
        if self.params[0].device.type == "cpu":  # on the host, act on (and log) only the clamped matrices
            for k in over.nonzero().flatten().tolist():
                i = index[k]
                if before is not None:  # W_before + c·ΔW, exact where the copy exists
                    self.params[i].copy_(torch.lerp(before[i], self.params[i], factor[k].to(before[i])))
                else:
                    self.params[i].add_(neg_update[k], alpha=float(1 - factor[k]) * float(self._units.get(i, 1.0)))
                evidence = {"param": self.names[i], "ratio": float(ratio[k]), "max": self.limit[i]}
                ctx.events.append({"action": "clamp", "step": ctx.step, **evidence})
                log.info("sentinel clamp: step %d %s", ctx.step, evidence)
        else:  # on a device, no host sync: every matrix gets W += (1 - c)·(-ΔW), a no-op where c = 1
            units = torch.tensor([float(self._units.get(i, 1.0)) for i in index], device=factor.device)
            torch._foreach_mul_(neg_update, list(((1 - factor) * units).unbind()))
            torch._foreach_add_([self.params[i] for i in index], neg_update)

    def columns(self) -> dict[str, Tensor]:
        return {"clamp_factor": self.factor.clone()}

    def scalars(self) -> dict[str, Tensor]:
        return {"clamp_events": self.events.float()}

    def state_dict(self) -> dict[str, Any]:
        return {"events": int(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events.fill_(int(state["events"]))
        self._lower.clear()  # weights are being restored: start from exact norms
