"""Per-tensor optimizer statistics, reduced on the device into one packed tensor.

Why these statistics: the update ratio ‖ΔW‖/‖W‖ and its spread across matrices is the
precursor of loss spikes in WeSaR (papers/001, §3); the RMS of the gradient and of Adam's
√v̂ against ε shows the update-shrinking regime of Wortsman et al. (papers/003, §3.4).

How: every reduction is a ``torch._foreach_*`` call over chunks of at most
``chunk_elements`` elements, and the result is one (tensors x stats) tensor on the device,
so the host sees one transfer per publish.  ‖W‖ is taken in the optimizer's pre-step hook,
where W is still the weight the update applies to; the gradient norms are the pre-clip ones
the gradient hooks measured during backward (sentinel/gradnorms.py), times any multiplier
sentinel applied before the statistics (WeSaR's α), or, without those hooks (DDP), the norms
of the gradients the step receives.  For Adam and AdamW the update is rebuilt from the
optimizer state after the step instead of copying the parameters before it; with
b1 = 1-β1^t, b2 = 1-β2^t, s = lr/(1-lr·wd) (wd = 0 for Adam, whose weight decay is already
inside m) and D = √v + ε·√b2:

    -ΔW = s·wd·W_new + s·(√b2/b1)·m/D

which needs one scratch list the size of a chunk, not a copy of the model.

Sharded parameters (FSDP2's DTensors): every reduction runs on this rank's shards, the
per-tensor norms are squared into sums (‖x‖², Σv, counts), and the packed (tensors x 5)
float64 tensor is all-reduced once (collectives.ShardSum) before norms, ratios and RMS are
formed, so every rank holds the statistics of the whole tensors.  A failure on one rank must
not leave the others waiting in that collective: under sharding the failing rank logs it and
takes part with NaN statistics and a failure flag; at the next statistics step every rank reads
the flag and turns statistics off together.  docs/distributed.md has the costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sentinel.adam import adam_chunks, chunks, is_adam
from sentinel.collectives import ShardSum, local
from sentinel.optim.base import StepContext, Transform, merge_factors

__all__ = ["StatsTap", "TensorStats", "is_adam"]

log = logging.getLogger("sentinel")

GRAD = ("grad_l2", "grad_rms", "param_l2")
UPDATE = ("update_l2", "update_ratio")
ADAM = ("sqrt_v_rms", "sqrt_v_below_eps_fraction")


class TensorStats:
    """The statistics of the optimizer's parameters around one step.

    ``mode`` is 'reconstruct' (Adam/AdamW only), 'copy' (snapshot before the step on
    statistics steps: one copy of the parameters while the step runs) or 'off'.
    Call :meth:`before_step` from the optimizer's pre-step hook and :meth:`after_step`
    from its post-step hook.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        group_of: list[int],
        names: tuple[str, ...],
        mode: str,
        chunk_elements: int,
    ):
        self.optimizer = optimizer
        self.mode = mode
        self.chunk_elements = chunk_elements
        self.params, self.group_of, self.names = params, group_of, names
        self.adam = is_adam(optimizer)
        self.stats = GRAD + (UPDATE if mode != "off" else ()) + (ADAM if self.adam else ())
        self.shards = ShardSum.for_params(params)
        self._failed = False
        device = local(self.params[0]).device
        self._zero = torch.zeros((), device=device)
        self._numel = torch.tensor([p.numel() for p in self.params], device=device, dtype=torch.float32)
        self._before: list[Tensor] | None = None
        self._with_grad: list[int] = []
        self._grad_l2: list[Tensor] = []
        self._param_l2: list[Tensor] = []
        self.host_steps: bool | None = None  # Adam's step counters on the host (None: look at the state)

    @property
    def snapshot_bytes(self) -> int:
        """Extra memory the 'copy' mode holds during a statistics step."""
        return sum(local(p).numel() * p.element_size() for p in self.params) if self.mode == "copy" else 0

    @torch.no_grad()
    def before_step(
        self,
        pre_clip: Tensor | None = None,
        factors: dict[int, Any] | None = None,
        pending: dict[int, Any] | None = None,
        units: dict[int, Any] | None = None,
    ) -> None:
        """Gradient norms and ‖W_before‖ (and the snapshot in 'copy' mode).

        ``pre_clip``: per tensor, the gradient norm before the user's clipping (sentinel/gradnorms.py),
        to be multiplied by ``factors`` (what sentinel multiplied gradients by so far, by tensor);
        without it the gradients are read as the step finds them.  The fused step multiplies no
        gradient and keeps W̄ = α·W in the module: ``pending`` are the multipliers it will fold into
        its kernel (the gradient of W is α·ḡ), ``units`` the α with ‖W‖ = ‖W̄‖/α.
        Sharded: if any rank's statistics failed at the previous statistics step, raise on every
        rank alike, so that all of them turn statistics off at the same step.
        """
        if self.shards is None:
            return self._before_step(pre_clip, factors, pending, units)
        failed = self.shards.failures()
        if failed:
            raise RuntimeError(f"statistics failed on {failed} rank(s) at the previous statistics step")
        try:
            self._before_step(pre_clip, factors, pending, units)
        except Exception:
            self._fail("before")

    def _before_step(self, pre_clip: Tensor | None, factors: dict | None, pending: dict | None, units: dict | None):
        params = [local(p) for p in self.params]
        self._with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if pre_clip is not None:
            both = merge_factors(dict(factors or {}), pending or {})
            self._grad_l2 = pre_clip * _multipliers(both, pre_clip) if both else pre_clip
        else:
            self._grad_l2 = [self._zero] * len(params)
            if self._with_grad:
                grads = [local(self.params[i].grad) for i in self._with_grad]
                for i, v in zip(self._with_grad, torch._foreach_norm(grads)):
                    self._grad_l2[i] = v * abs(pending[i]) if pending and i in pending else v
        self._param_l2 = list(torch._foreach_norm(params))
        for i, a in (units or {}).items():
            self._param_l2[i] = self._param_l2[i] / a
        if self.mode == "copy":
            self._before = [p.detach().clone() for p in params]

    def _fail(self, when: str) -> None:
        if not self._failed:
            log.exception(
                "sentinel: statistics failed %s the step on this rank; it joins this step's shard reduction "
                "with NaN statistics, and every rank turns statistics off at the next statistics step",
                when,
            )
        self._failed = True

    @torch.no_grad()
    def after_step(self, grad_scale: list | None = None, units: dict[int, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Return (stats matrix [tensors x stats], global grad L2 norm), both on the device.

        ``grad_scale``: per tensor, the units Adam's state is kept in (set by the ε tuner).
        ``units``: the fused step's α' (the module holds α'·W' after it), by tensor.
        """
        if self.shards is None:
            norms, root_b2 = self._local_norms(torch.float32, units)
        else:
            try:
                if self._failed:
                    raise RuntimeError("statistics failed before the step on this rank")
                norms, root_b2 = self._local_norms(torch.float64, units)
            except Exception:
                self._fail("after")
                norms = torch.full((len(self.params), 5), float("nan"), dtype=torch.float64, device=self._zero.device)
                root_b2 = [1.0] * len(self.params)
            norms = self.shards(norms.square(), failed=self._failed).sqrt()
        g, w, update, root_v, below = norms.float().unbind(1)

        numel = self._numel
        columns = {"grad_l2": g, "grad_rms": g / numel.sqrt(), "param_l2": w}
        if self.mode != "off":
            columns["update_l2"] = update
            columns["update_ratio"] = torch.where(w == 0, torch.zeros_like(w), update / w)  # 0 for an all-zero W
        if self.adam:
            rb2 = torch.tensor(root_b2, device=numel.device) if isinstance(root_b2[0], float) else torch.stack(root_b2)
            if grad_scale is not None:
                rb2 = rb2 * torch.stack([torch.as_tensor(x, device=rb2.device) for x in grad_scale]).float()
            columns["sqrt_v_rms"] = root_v / (numel.sqrt() * rb2)
            columns["sqrt_v_below_eps_fraction"] = below.square() / numel
        matrix = torch.stack([columns[s] for s in self.stats], dim=1)
        return matrix, g.square().sum().sqrt()

    def _local_norms(self, dtype: torch.dtype, units: dict[int, Any] | None) -> tuple[Tensor, list]:
        """Per tensor, L2 norms over this rank's elements of (grad, W, ΔW, √v, [√v̂ < ε]), and √b2."""
        n = len(self.params)
        update_l2 = [self._zero] * n
        root_v, below, root_b2 = [self._zero] * n, [self._zero] * n, [1.0] * n
        if self.mode == "copy":
            self._copy_update(update_l2)
        if self.adam:
            self._adam(update_l2, root_v, below, root_b2, units)
        cols = (self._grad_l2, self._param_l2, update_l2, root_v, below)
        return torch.stack([(c if isinstance(c, Tensor) else torch.stack(c)).to(dtype) for c in cols], dim=1), root_b2

    def _copy_update(self, update_l2: list[Tensor]) -> None:
        before, self._before = self._before, None
        params = [local(p) for p in self.params]
        for chunk in chunks(range(len(params)), params, self.chunk_elements):
            delta = torch._foreach_sub([params[i] for i in chunk], [before[i] for i in chunk])
            for i, d in zip(chunk, torch._foreach_norm(delta)):
                update_l2[i] = d

    def _adam(self, update_l2: list[Tensor], root_v: list, below: list, root_b2: list, units: dict | None) -> None:
        """Per chunk of Adam state: ‖√v‖ and √b2, the count of √v̂ < ε, and (reconstruct) ‖ΔW‖.

        √v̂ < ε ⇔ √v < ε·√b2, kept as √count so that it reduces across shards like the norms.  On
        the CPU one comparison per tensor (``count_nonzero(√v < ε·√b2)``) reads the state once; on
        an accelerator batched ops only (‖sign(min(√v - ε·√b2, 0))‖₂), a few launches for all tensors.
        """
        for c in adam_chunks(
            self.optimizer, self.params, self.group_of, self._with_grad, self.chunk_elements, self.host_steps
        ):
            if units:  # the module holds α'·W': the decay term of ΔW reads W'
                c.param_scale = [1.0 / float(units.get(i, 1.0)) for i in c.index]
            d = c.sqrt_v()
            counts = below_counts(d, [c.eps * r for r in c.root_b2])
            for i, norm, count, r in zip(c.index, torch._foreach_norm(d), counts, c.root_b2):
                root_v[i], below[i], root_b2[i] = norm, count, r
            del counts
            if self.mode == "reconstruct":
                for i, norm in zip(c.index, torch._foreach_norm(c.neg_update(d))):
                    update_l2[i] = norm


def below_counts(d: list[Tensor], limits: list, batched: bool | None = None) -> list[Tensor]:
    """Per tensor, √(number of elements of ``d`` below its limit), as a norm (it reduces like one).

    ``batched`` (default: off the CPU) uses foreach ops, a few launches for every tensor.  On the
    CPU each tensor's minimum is read first, and only a tensor whose minimum is below its limit
    (in practice the embedding rows of tokens not yet seen) is counted element by element: one
    read of the state instead of four passes over a copy of it.
    """
    if batched is None:
        batched = bool(d) and d[0].device.type != "cpu"
    if not batched:
        zero = d[0].new_zeros(()) if d else None
        return [
            torch.count_nonzero(x < t).to(x.dtype).sqrt() if float(x.amin()) < float(t) else zero
            for x, t in zip(d, limits)
        ]
    diff = torch._foreach_sub(d, limits)
    torch._foreach_clamp_max_(diff, 0.0)
    torch._foreach_sign_(diff)
    return list(torch._foreach_norm(diff))


def _multipliers(factors: dict[int, Any], like: Tensor) -> Tensor:
    """|factor| per tensor (1 where none) as one vector on ``like``'s device, with no host-to-device copy."""
    one = like.new_ones(())
    parts = [one] * len(like)
    for i, f in factors.items():
        parts[i] = f.reshape(()).to(like.dtype) if isinstance(f, Tensor) else like.new_full((), float(f))
    return torch.stack(parts).abs()


class StatsTap(Transform):
    """TensorStats as a stage of the optimizer chain, on the steps ``due()`` selects."""

    name = "stats"

    def __init__(self, stats: TensorStats, due: Callable[[], bool]):
        self.stats, self.due = stats, due
        self.pending: tuple[Tensor, Tensor] | None = None
        self.units_of: Callable[[], dict[int, Any]] | None = None  # fused step with WeSaR: α before the update
        self.units_after_of: Callable[[], dict[int, Any]] | None = None  # and α' after it

    def before_step(self, ctx: StepContext) -> None:
        if self.due():
            pre = ctx.pre_clip
            units = self.units_of() if self.units_of is not None else None
            self.stats.before_step(pre.norms if pre is not None else None, ctx.applied, ctx.grad_factor, units)

    def after_step(self, ctx: StepContext) -> None:
        if self.due():
            units = self.units_after_of() if self.units_after_of is not None else None
            self.pending = self.stats.after_step(ctx.grad_scale, units)
            if self.stats.shards is not None and "update_l2" in self.stats.stats:  # the clamp reuses it (sharded)
                ctx.update_l2 = self.pending[0][:, self.stats.stats.index("update_l2")]
