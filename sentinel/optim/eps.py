"""Adam-ε auto-tuning: keep each tensor's ε well below its √v̂ (papers/003, Wortsman et al., §3.4).

Why: when gradients shrink (large models, late training, a loss scaled down), Adam's √v̂
falls toward ε and the update m̂/(√v̂ + ε) shrinks with it: training stalls although nothing
is wrong.  Wortsman et al. show grad RMS reaching ε = 1e-8 at scale, ε = 1e-15 fixing it,
and a larger ε (1e-6) diverging.  So ε is only ever lowered, never raised past the user's.

Rule: every ``every`` steps, per tensor, ε_t = clamp(ratio × RMS(√v̂), floor, ε_user),
rounded down to ``per_decade`` buckets per decade (so it does not churn).  Default ratio
1e-3: ε then moves an average element's denominator by 0.1 %.  Default floor 1e-16: below
Wortsman's working 1e-15, and far above float32's smallest normal (1.2e-38) for v̂ ~ ε².

How, without a param group per tensor (so fused/foreach AdamW and LR schedulers are
untouched): Adam is invariant to scaling a tensor's gradient by s except for ε, so
gradient and state kept in units × s give update m̂/(√v̂ + ε_user/s).  Each tensor has its
own s = ε_user/ε_t ≥ 1; gradients are multiplied by s before the step, and when s changes,
the state is rescaled (m by r, v by r²) to the new units. Deciding whether anything
changed reads one small vector from the device every ``every`` steps; a host copy of the scales
lets tensors whose s is 1 skip the multiply (the chain merges s with WeSaR's α).  Adam's state therefore holds
scaled values; ``scale`` is in sentinel's state_dict so a resumed run continues exactly.
Sharded parameters (FSDP2, tensor parallel): RMS(g) and RMS(√v̂) are the whole tensors', from
the shard sums reduced before the step (sentinel/optim/sharded.py); the scales are one plain
vector, the same on every rank, so ε is per logical tensor.
Needs decoupled weight decay (AdamW, or Adam without weight decay): Adam's L2 term would
be added to the scaled gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from sentinel.adam import is_adam
from sentinel.collectives import local
from sentinel.optim.base import StepContext, Transform, scale_grads
from sentinel.optim.sharded import sq_norms


def _times(a: Any, b: Any) -> Any:
    """The product of two optional gradient multipliers (None: 1)."""
    if a is None:
        return 1.0 if b is None else b
    return a if b is None else a * b


log = logging.getLogger("sentinel")


class EpsTune(Transform):
    name = "eps"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        group_of: list[int],
        *,
        ratio: float = 1e-3,
        floor: float = 1e-16,
        every: int = 10,
        per_decade: int = 4,
    ):
        if not is_adam(optimizer):
            raise ValueError(f"eps auto-tuning needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False):
                raise ValueError(
                    "eps auto-tuning needs decoupled weight decay: use AdamW (Adam adds wd·W to the gradient)"
                )
        self.optimizer, self.params, self.group_of = optimizer, params, group_of
        self.ratio, self.floor, self.every, self.per_decade = ratio, floor, every, per_decade
        device = params[0].device
        self.user_eps = torch.tensor([float(optimizer.param_groups[g]["eps"]) for g in group_of], device=device)
        self.scale = torch.ones(len(params), device=device)
        self._host = self.scale.tolist()  # host copy, refreshed whenever ``scale`` changes
        self.calls = 0
        self.tuned = False  # retune on the first step that has Adam state, then every ``every`` steps
        self._fresh = set(range(len(params)))  # tensors without Adam state yet: ε from their first gradient

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        if self._fresh:
            self._from_gradient(ctx)
        if self._retune_due():
            self._retune(ctx)
        self.calls += 1
        scales = list(self.scale.unbind())
        factors = self._host if self.scale.device.type == "cpu" else scales
        changed = [i for i, s in enumerate(self._host) if s != 1.0]  # s = 1 (ε not lowered): nothing to scale
        scale_grads(ctx, changed, [factors[i] for i in changed])
        ctx.grad_scale = scales

    def _from_gradient(self, ctx: StepContext) -> None:
        """ε for a tensor's first update, before Adam has state: there v̂ = g², so RMS(√v̂) = RMS(g).

        Without it the first update runs with the optimizer's ε and, for gradients far below
        it, is lost (loss × 1e-10 on the tiny GPT: loss 5.57 instead of 4.82 after step 0).
        The gradient is read in true units: times the multipliers the chain has not applied yet.
        """
        state = self.optimizer.state
        idx = [i for i in sorted(self._fresh) if self.params[i].grad is not None]
        if not idx:
            return
        self._fresh.difference_update(idx)
        idx = [i for i in idx if "exp_avg_sq" not in state.get(self.params[i], {})]
        if not idx:
            return
        pending = ctx.grad_factor or {}
        if ctx.sums is not None:  # sharded: whole-tensor ‖g‖ as the step found it, times what was applied since
            norms = ctx.sums["eps.grad"][idx].sqrt().float() * abs(ctx.guard_scale)
            pending = {i: _times(ctx.applied.get(i), pending.get(i)) for i in idx}
        else:
            norms = torch.stack(torch._foreach_norm([self.params[i].grad for i in idx])).float()
        factor = torch.stack([torch.as_tensor(pending.get(i, 1.0), dtype=torch.float32) for i in idx])
        numel = torch.tensor([self.params[i].numel() for i in idx], dtype=torch.float32)
        rms = norms * factor.to(norms.device).abs() / numel.to(norms.device).sqrt()
        self._set(idx, rms, "first gradient")

    def _retune_due(self) -> bool:
        return self.calls % self.every == 0 or not self.tuned

    def sum_keys(self, ctx: StepContext) -> tuple[str, ...]:
        return ("eps.grad",) * bool(self._fresh) + ("eps.v",) * self._retune_due()

    def shard_sums(self, ctx: StepContext) -> dict[str, dict[int, Tensor]]:
        """‖g‖² of the tensors still without an ε, Σv of those with Adam state, over this rank's shards."""
        out: dict[str, dict[int, Tensor]] = {}
        state = self.optimizer.state
        if self._fresh:
            idx = [i for i in sorted(self._fresh) if self.params[i].grad is not None]
            out["eps.grad"] = dict(zip(idx, sq_norms([self.params[i].grad for i in idx])))
        if self._retune_due():
            idx = [i for i, p in enumerate(self.params) if "exp_avg_sq" in state.get(p, {})]
            v = [local(state[self.params[i]]["exp_avg_sq"]) for i in idx]
            out["eps.v"] = dict(zip(idx, (x.double() for x in torch._foreach_norm(v, 1)))) if idx else {}
        return out

    def _set(self, idx: list[int], rms: Tensor, source: str) -> Tensor | None:
        """New scales for tensors ``idx`` from RMS(√v̂) in true units; the ratio new/old, or None if unchanged."""
        old = self.scale[idx]
        user = self.user_eps[idx]
        target = torch.minimum(torch.clamp(self.ratio * rms, min=self.floor), user)
        exponent = torch.ceil(torch.log10(user / target) * self.per_decade - 1e-6) / self.per_decade
        new = torch.clamp(10.0**exponent, min=1.0, max=float(user.max() / self.floor))
        if torch.equal(new, old):
            return None
        self.scale[idx] = new
        self._host = self.scale.tolist()
        log.info(
            "sentinel eps: %d tensor(s) retuned at step %d from the %s; effective ε now in [%.3g, %.3g] "
            "(RMS √v̂ in [%.3g, %.3g])",
            int((new != old).sum()),
            self.calls,
            source,
            float((user / new).min()),
            float((user / new).max()),
            float(rms.min()),
            float(rms.max()),
        )
        return new / old

    def _retune(self, ctx: StepContext | None = None) -> None:
        state = self.optimizer.state
        idx = [i for i, p in enumerate(self.params) if "exp_avg_sq" in state.get(p, {})]
        if not idx:
            return
        groups = self.optimizer.param_groups
        v = [local(state[self.params[i]]["exp_avg_sq"]) for i in idx]
        b2 = torch.stack(
            [1 - groups[self.group_of[i]]["betas"][1] ** state[self.params[i]]["step"].to(v[0].device) for i in idx]
        ).float()
        numel = torch.tensor([self.params[i].numel() for i in idx], device=v[0].device, dtype=torch.float32)
        if ctx is not None and ctx.sums is not None:  # sharded: Σv of the whole tensors
            sums = ctx.sums["eps.v"][idx].float()
        else:
            sums = torch.stack(torch._foreach_norm(v, 1)).float()
        self.tuned = True
        rms = (sums / (numel * b2)).sqrt() / self.scale[idx]  # RMS of √v̂ in true gradient units
        ratio = self._set(idx, rms, "Adam state")
        if ratio is None:
            return
        r = list(ratio.unbind())
        r2 = list(ratio.square().unbind())
        sts = [state[self.params[i]] for i in idx]
        torch._foreach_mul_([local(s["exp_avg"]) for s in sts], r)
        torch._foreach_mul_([local(s["exp_avg_sq"]) for s in sts], r2)
        ams = [k for k, s in enumerate(sts) if "max_exp_avg_sq" in s]
        if ams:
            torch._foreach_mul_([local(sts[k]["max_exp_avg_sq"]) for k in ams], [r2[k] for k in ams])

    def columns(self) -> dict[str, Tensor]:
        return {"adam_eps": (self.user_eps / self.scale).float()}

    def scalars(self) -> dict[str, Tensor]:
        """``adam_eps`` (what the agent compares √v̂ with) is the smallest effective ε, as ``adam_eps_min``."""
        eff = self.user_eps / self.scale
        low = eff.min()
        return {"adam_eps": low, "adam_eps_min": low, "adam_eps_max": eff.max()}

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.cpu().clone(), "calls": self.calls, "tuned": self.tuned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.copy_(state["scale"])
        self._host = self.scale.tolist()
        self.calls = int(state["calls"])
        self.tuned = bool(state["tuned"])
        if self.tuned:  # the scales are known: no first-gradient estimate over them
            self._fresh.clear()
