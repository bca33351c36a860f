"""The one place that composes the transforms, in a fixed, documented order.

Before the step (pre-step hook), in this order:
  1. guard   decides on the pre-clip global gradient norm (ctx.pre_clip, sentinel/gradnorms.py)
             whether this update happens at all; a skipped step runs nothing else.
  2. wesar   turns W̄ into the actual W and ḡ into the gradients of W and of the gates.
  5. clamp   notes ‖W‖ of the matrices it bounds.
  3. stats   reads the pre-clip gradient norms times the multipliers applied so far
             (ctx.applied) and ‖W‖ (actual parameters, true gradient units).
  4. eps     scales gradients into the per-tensor units that give each tensor its own ε.
After the step (post-step hook), in reverse:
  4. eps     nothing to undo (Adam's state stays in the scaled units; eps knows them).
  3. stats   rebuilds the update the optimizer proposed.
  5. clamp   pulls an update ratio above its role's maximum back to it.
  2. wesar   writes W̄ = α·W back into the module.
Gradient multipliers (WeSaR's α, ε's scale) are collected and applied in one pass, before
the statistics when they are on (base.scale_grads).
Statistics therefore describe the actual parameters WeSaR trains and the update the
optimizer proposed; the clamp's per-tensor factor says how much of it was applied.
Sharded parameters (DTensor): before step 1 the transforms' whole-tensor sums are packed and
all-reduced once (sentinel/optim/sharded.py), so every rank takes the same decisions.
"""

from __future__ import annotations

import logging
from typing import Any

import sentinel.optim.sharded as sharded
from sentinel.optim.base import StepContext, Transform, apply_grad_factors, merge_factors

log = logging.getLogger("sentinel")

PRE_ORDER = ("guard", "wesar", "clamp", "stats", "eps")
POST_ORDER = ("eps", "stats", "clamp", "wesar")


class Chain:
    def __init__(self, transforms: dict[str, Transform], fused: Any = None):
        unknown = set(transforms) - set(PRE_ORDER) - set(POST_ORDER)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}")
        self.transforms = transforms
        self.fused = fused  # sentinel.optim.fused.FusedStep: the update is made here (fused.py)
        self.errors = 0
        self._shards: Any = False  # ShardSum of the parameters (None: whole tensors), found at the first step

    def _sums(self, ctx: StepContext) -> None:
        """Sharded parameters: the transforms' whole-tensor sums for this step, in one all-reduce.

        If any rank failed to compute its part, every rank skips this update (the guard drops the
        gradients), so that no rank acts on sums the others do not have.
        """
        if self._shards is False:
            try:
                self._shards = sharded.shard_sum(ctx.params)
            except ValueError:  # no exact reduction: build() turned off every transform that needs one
                self._shards = None
        if self._shards is None:
            return
        ctx.sums = sharded.collect(self.transforms, PRE_ORDER, ctx, self._shards)
        if ctx.sums is not None and ctx.sums.failed:
            self.errors += 1
            guard = self.transforms.get("guard")
            reason = {"reason": f"shard sums failed on {ctx.sums.failed} rank(s)"}
            if guard is not None:
                guard._skip(ctx, reason)
            else:
                for p in ctx.params:
                    p.grad = None
                ctx.skip = True
                log.error("sentinel: update skipped at step %d: %s", ctx.step, reason)

    def _call(self, name: str, method: str, ctx: StepContext) -> None:
        """One transform's hook; a failure is logged and never reaches the training loop.

        The failing transform is turned off, except WeSaR: its before/after pair must keep
        converting between W and W̄, or the module would be left holding the wrong weight.
        """
        t = self.transforms.get(name)
        if t is None:
            return
        try:
            getattr(t, method)(ctx)
        except Exception:
            self.errors += 1
            keep = name == "wesar"
            log.exception(
                "sentinel: %s.%s failed at step %d; %s", name, method, ctx.step, "kept" if keep else "now off"
            )
            if not keep:
                self.transforms.pop(name)

    def before_step(self, ctx: StepContext) -> None:
        """The pre-step transforms; gradient multipliers are collected and applied in one pass.

        Statistics read gradients in true units, so WeSaR's pending α is applied before them;
        without statistics, α and ε's scale are merged into a single multiply.
        """
        ctx.grad_factor = {}
        if self.fused is not None:
            self._fused_before(ctx)
            return
        try:
            self._sums(ctx)
            if ctx.skip:
                return
            for name in PRE_ORDER:
                if name == "stats" and name in self.transforms:
                    self._flush(ctx)
                self._call(name, "before_step", ctx)
                if ctx.skip:
                    return
        finally:
            self._flush(ctx)
            ctx.grad_factor = None

    def _fused_before(self, ctx: StepContext) -> None:
        """The pre-step transforms, then the update itself, with α·s per tensor as the kernel's grad scale.

        A failing fused update is logged; that step's remaining tensors are not updated (the
        optimizer's own step would update the finished ones twice) and the hook path takes over.
        """
        try:
            self._sums(ctx)
            if ctx.skip:
                return
            for name in PRE_ORDER:
                self._call(name, "before_step", ctx)
                if ctx.skip:
                    return
            wesar = self.transforms.get("wesar")
            try:
                alpha = new_alpha = {}
                if wesar is not None:
                    alpha = wesar.alpha_by_index()
                    wesar.step_gates()
                    new_alpha = wesar.new_alpha_by_index()
                self.fused.step(ctx, alpha, new_alpha)
            except Exception:
                self.errors += 1
                log.exception("sentinel: the fused Adam step failed at step %d; the hook path takes over", ctx.step)
                for i, a in alpha.items():  # not updated: still α·W, and the gates already hold α'
                    if i not in self.fused.done and i in new_alpha:
                        ctx.params[i].data.mul_(float(new_alpha[i]) / float(a))
                self.fused._hold(ctx)
                self._fused_failed = True
        finally:
            ctx.grad_factor = None

    def _fused_after(self, ctx: StepContext) -> None:
        self.fused.restore()
        for name in POST_ORDER:
            self._call(name, "after_step", ctx)
        if getattr(self, "_fused_failed", False):
            self.fused = None
            for t in self.transforms.values():
                if hasattr(t, "fused"):
                    t.fused = False
                if hasattr(t, "units_of"):
                    t.units_of = t.units_after_of = None

    def _flush(self, ctx: StepContext) -> None:
        factors, ctx.grad_factor = ctx.grad_factor or {}, {}
        if factors and not ctx.skip:
            try:
                apply_grad_factors(ctx.params, factors)
                merge_factors(ctx.applied, factors)
            except Exception:
                self.errors += 1
                log.exception("sentinel: scaling gradients failed at step %d", ctx.step)

    def after_step(self, ctx: StepContext) -> None:
        if ctx.skip:
            return
        if self.fused is not None:
            self._fused_after(ctx)
            return
        for name in POST_ORDER:
            self._call(name, "after_step", ctx)

    def columns(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in self.transforms.values():
            out.update(t.columns())
        return out

    def scalars(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in self.transforms.values():
            out.update(t.scalars())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: t.state_dict() for name, t in self.transforms.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, t in self.transforms.items():
            if name in state:
                t.load_state_dict(state[name])
