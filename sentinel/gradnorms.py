"""Pre-clip gradient norms, measured while backward accumulates each gradient.

Why: the optimizer's step pre-hook, where the statistics and the guard run, comes after the
user's ``clip_grad_norm_`` (the usual loop, the Hugging Face Trainer), so a norm taken there
is the clipped one: about ``max_norm`` at every step, and a gradient excursion is invisible
(BLOOM-176B's grad norm rose from 0.24 to 960 before its loss spike).

How: a ``Tensor.register_post_accumulate_grad_hook`` on every optimizer parameter writes
‖g‖ into that tensor's slot of one device buffer when its gradient has been accumulated: one
norm kernel, no host sync.  Under gradient accumulation the hook fires once per micro-batch
and the last write wins, so the slot holds the norm of the summed gradient.  With a
``GradScaler`` (``grad_scaler=`` of ``sentinel.attach``) the hooks see scaled gradients; the
slots are divided by the scale read at the step pre-hook, on the device.  Hooks exist only
for the backward passes of steps that need them (:meth:`GradNorms.arm` from ``observe()``,
like the forward probes); other steps run with no hook at all.

At the step pre-hook :meth:`GradNorms.measure` returns the pre-clip norm of every tensor:
the hook's value where it fired this step, else the norm of ``.grad`` as the step finds it
(a gradient assigned directly, not accumulated).  It can also give the norms the optimizer
received: a tensor whose gradient is the one its hook saw, with an unchanged version
counter, is not read again.

Not under DDP: there a hook sees the local gradient before the all-reduce, so with
torch.distributed on more than one rank only DTensor parameters get hooks, and a DDP model
none (logged once).  FSDP2 runs its sharded parameters' hooks after the reduce-scatter, so
they see this rank's shard of the reduced gradient; the norms are then per shard, and the
statistics add them up across ranks (sentinel/collectives.py).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sentinel import collectives
from sentinel.collectives import DTensor, local

log = logging.getLogger("sentinel")

DDP_NOTE = (
    "sentinel: DDP (torch.distributed without DTensor parameters): gradient statistics and the guard are post-clip, "
    "read at the optimizer step, since a gradient hook would see the local gradient before the all-reduce; pass "
    "sn.observe(loss=..., grad_norm=clip_grad_norm_(...)) to publish the pre-clip global norm"
)


@dataclass
class PreClip:
    """One step's gradient norms, per optimizer tensor, float, on the device."""

    norms: Tensor  # pre-clip ‖g‖ in true units (divided by the loss scale)
    received: Tensor | None  # ‖g‖ the optimizer step receives (true units where unchanged); None when not asked for
    hooked: int  # tensors whose hook fired this step
    sharded: bool  # local shards only: the global norm needs the statistics' all-reduce
    clip: Tensor | None = None  # clip_factor(), when the received norms were asked for

    def total(self) -> Tensor:
        """The global pre-clip L2 norm (this rank's shards when ``sharded``), as ``clip_grad_norm_`` forms it."""
        return torch.linalg.vector_norm(self.norms.float())

    def clip_factor(self) -> Tensor | None:
        """(global norm the optimizer received) / (global pre-clip norm); 1 when that is 0; None if unknown."""
        if self.received is None or self.sharded or not self.hooked:
            return None
        pre = self.total()
        got = pre if self.received is self.norms else torch.linalg.vector_norm(self.received.float())
        return torch.where(pre == 0, torch.ones_like(pre), got / pre)


class GradNorms:
    """Post-accumulate-grad hooks on ``params``; see the module docstring.

    ``persistent``: keep the hooks registered on unneeded steps, returning at once, instead of
    removing them (benchmarks/overhead.py ``--grad-hooks`` times both; removal is the default).
    """

    def __init__(self, params: list[Tensor], grad_scaler: Any = None, *, hooked: list[bool] | None = None,
                 persistent: bool = False):  # fmt: skip
        self.params = params
        self.scaler = grad_scaler
        self.persistent = persistent
        self.device = local(params[0]).device
        wide = any(p.dtype == torch.float64 for p in params)
        self._buf = torch.zeros(len(params), dtype=torch.float64 if wide else torch.float32, device=self.device)
        self._slots = list(self._buf.unbind())
        self._hooked = hooked if hooked is not None else [True] * len(params)
        self._hooks: list[Callable | None] = [self._hook(i) if h else None for i, h in enumerate(self._hooked)]
        self._fired = [False] * len(params)
        self._seen: list[tuple[Any, int] | None] = [None] * len(params)
        self._handles: list[Any] = []
        self.sharded = any(DTensor is not None and isinstance(p, DTensor) for p in params)
        self.armed = False
        self.failed = False
        self._noted = False

    @classmethod
    def create(cls, params: list[Tensor], grad_scaler: Any = None, **kw: Any) -> GradNorms | None:
        """The hooks ``params`` can use; None under DDP, where none would see the reduced gradient (logged at INFO),
        and when they cannot be set up (logged: the statistics then read the gradients at the step)."""
        if not params:
            return None
        try:
            hooked = None
            if collectives.world_size() > 1:
                hooked = [DTensor is not None and isinstance(p, DTensor) for p in params]
                if not any(hooked):
                    log.info(DDP_NOTE)
                    return None
            return cls(params, grad_scaler, hooked=hooked, **kw)
        except Exception:
            log.exception("sentinel: gradient hooks could not be set up; gradient statistics are read at the step")
            return None

    # -- arming ------------------------------------------------------------------------------

    def arm(self) -> None:
        """Measure the coming backward pass(es): register the hooks (or wake them) and forget the last step's."""
        if self.failed:
            self._remove()
            return
        self._fired = [False] * len(self.params)
        if not self._handles:
            try:
                for p, hook in zip(self.params, self._hooks):
                    if hook is not None:
                        self._handles.append(p.register_post_accumulate_grad_hook(hook))
            except Exception:
                self._fail("registering gradient hooks failed")
                return
        self.armed = True

    def disarm(self) -> None:
        """No measurement for the coming backward: remove the hooks (or, ``persistent``, let them return at once)."""
        self.armed = False
        if not self.persistent:
            self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self) -> None:
        self.armed = False
        self._remove()

    def _fail(self, what: str, remove: bool = True) -> None:
        """Log once and stop measuring; a hook leaves the removal to the next arm, measure or close."""
        if not self.failed:
            log.exception("sentinel: %s; pre-clip gradient norms are off (statistics read the gradients at the step)",
                          what)  # fmt: skip
        self.failed = True
        self.armed = False
        if remove:
            self._remove()

    def _hook(self, i: int) -> Callable:
        slot = self._slots[i]
        p = self.params[i]
        direct = local(p).device == self.device and (p.dtype != torch.float64 or slot.dtype == torch.float64)

        def hook(param: Tensor) -> None:
            if not self.armed:
                return
            try:
                g = param.grad
                if g is None:
                    return
                flat = local(g).detach()
                if direct:
                    torch.linalg.vector_norm(flat, dtype=slot.dtype, out=slot)
                else:
                    slot.copy_(torch.linalg.vector_norm(flat).to(slot.dtype), non_blocking=True)
                self._fired[i] = True
                self._seen[i] = (weakref.ref(g), flat._version)
            except Exception:
                self._fail("a gradient hook failed", remove=False)  # the hooks are being iterated

        return hook

    # -- the step ----------------------------------------------------------------------------

    def _scale(self) -> Tensor | float | None:
        """The GradScaler's scale as a device tensor (no host sync), or None when gradients are not scaled."""
        s = self.scaler
        if s is None or (hasattr(s, "is_enabled") and not s.is_enabled()):
            return None
        read = getattr(s, "_get_scale_async", None)
        if read is not None:
            t = read()
            return None if t is None else t.to(device=self.device, dtype=self._buf.dtype).reshape(())
        value = float(s.get_scale())
        return None if value == 1.0 else value

    def _unchanged(self, i: int, g: Tensor | None) -> bool:
        seen = self._seen[i]
        return g is not None and seen is not None and seen[0]() is g and local(g)._version == seen[1]

    @torch.no_grad()
    def measure(self, received: bool = False) -> PreClip | None:
        """This step's norms (see :class:`PreClip`); None when no hook was armed, or on failure (logged once)."""
        if not self.armed:
            if self.failed:
                self._remove()
            return None
        try:
            return self._measure(received)
        except Exception:
            self._fail("measuring pre-clip gradient norms failed")
            return None

    def _measure(self, received: bool) -> PreClip:
        n = len(self.params)
        grads = [p.grad for p in self.params]
        fired = self._fired
        hooked = [i for i in range(n) if fired[i]]
        scale = self._scale()
        raw = self._buf.clone()
        pre = raw if scale is None else raw / scale
        read = [i for i in range(n) if not fired[i] and grads[i] is not None]
        if received:
            read += [i for i in hooked if grads[i] is not None and not self._unchanged(i, grads[i])]
        now = dict(zip(read, torch._foreach_norm([local(grads[i]) for i in read]))) if read else {}
        if len(hooked) < n:
            zero = torch.zeros((), dtype=raw.dtype, device=self.device)
            parts = list(pre.unbind())
            for i in range(n):
                if not fired[i]:
                    parts[i] = now[i].to(raw.dtype) if i in now else zero
            pre = torch.stack(parts)
        got = None
        if received:  # a gradient its hook measured, unchanged since: the optimizer receives the pre-clip one
            if not read and len(hooked) == n:
                got = pre
            else:
                zero = torch.zeros((), dtype=raw.dtype, device=self.device)
                parts = pre.unbind()
                got = torch.stack([
                    now[i].to(raw.dtype) if i in now else parts[i] if fired[i] and grads[i] is not None else zero
                    for i in range(n)
                ])  # fmt: skip
        if not hooked and read and not self._noted:
            self._noted = True
            log.info(
                "sentinel: no gradient hook fired this step (gradients assigned, not accumulated by backward); "
                "gradient statistics are those the optimizer step receives, after any clipping; pass "
                "sn.observe(loss=..., grad_norm=clip_grad_norm_(...)) for the pre-clip global norm"
            )
        out = PreClip(pre, got, len(hooked), self.sharded)
        out.clip = out.clip_factor() if received else None
        return out
