"""What Adam's state says about the step it just took, without a copy of the parameters.

For torch.optim.Adam/AdamW (foreach, fused or for-loop), with b1 = 1-β1^t, b2 = 1-β2^t,
s = lr/(1-lr·wd) (wd = 0 for Adam, whose weight decay is already inside m) and
D = √v + ε·√b2, the step that produced W_new was

    -ΔW = s·wd·W_new + s·(√b2/b1)·m/D

(v is ``max_exp_avg_sq`` under amsgrad).  Work is done in chunks of at most
``chunk_elements`` elements, so scratch memory is bounded, and with batched (foreach) ops.
Step counters on the device (fused/capturable Adam) stay there: no host sync.  With sharded
(DTensor) parameters the chunks hold this rank's shards: the state is sharded like the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sentinel.collectives import local


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam and AdamW (foreach, fused or for-loop): the optimizers whose update we can rebuild."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)


def chunks(items: Iterable[int], params: Sequence[Tensor], max_elements: int) -> Iterator[list[int]]:
    """Consecutive runs of ``items`` holding at most ``max_elements`` elements (or one tensor)."""
    chunk, size = [], 0
    for i in items:
        n = params[i].numel()
        if chunk and size + n > max_elements:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += n
    if chunk:
        yield chunk


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float, on_host: bool) -> tuple[list, list]:
    """(1 - beta1**step, 1 - beta2**step) per tensor: floats for host counters, 0-dim tensors for device ones."""
    if on_host:
        values = torch.stack(steps).tolist()
        return [1.0 - beta1**t for t in values], [1.0 - beta2**t for t in values]
    return [1.0 - beta1**s for s in steps], [1.0 - beta2**s for s in steps]


@dataclass
class AdamChunk:
    index: list[int]
    params: list[Tensor]
    exp_avg: list[Tensor]
    v: list[Tensor]
    b1: list
    root_b2: list
    eps: float
    scale: float
    wd: float
    on_host: bool
    param_scale: list[float] | None = None  # per tensor, W = this × what the module holds (fused WeSaR: 1/α')

    def sqrt_v(self) -> list[Tensor]:
        """√v per tensor (not bias-corrected: √v̂ = √v/√b2), in new tensors."""
        return torch._foreach_sqrt(self.v)

    def neg_update(self, sqrt_v: list[Tensor]) -> list[Tensor]:
        """-ΔW of the step just taken; adds ε·√b2 to ``sqrt_v`` in place (it becomes D)."""
        torch._foreach_add_(sqrt_v, [self.eps * r for r in self.root_b2])
        coef = [self.scale * r / b for r, b in zip(self.root_b2, self.b1)]
        decay = [self.scale * self.wd * m for m in self.param_scale or [1.0] * len(self.params)]
        if self.on_host:
            u = torch._foreach_mul(self.params, decay) if self.wd else [torch.zeros_like(p) for p in self.params]
            torch._foreach_addcdiv_(u, self.exp_avg, sqrt_v, coef)
            return u
        u = torch._foreach_div(self.exp_avg, sqrt_v)  # addcdiv_ takes host scalars only
        torch._foreach_mul_(u, coef)
        if self.wd and self.param_scale is None:
            torch._foreach_add_(u, self.params, alpha=self.scale * self.wd)
        elif self.wd:
            torch._foreach_add_(u, torch._foreach_mul(self.params, decay))
        return u


def adam_chunks(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    group_of: Sequence[int],
    indices: Iterable[int],
    chunk_elements: int,
    host_steps: bool | None = None,
) -> Iterator[AdamChunk]:
    """Chunks of the parameters in ``indices`` that have Adam state, one param group at a time (local shards)."""
    state = optimizer.state
    by_group: dict[int, list[int]] = {}
    for i in indices:
        if "exp_avg_sq" in state.get(params[i], {}):
            by_group.setdefault(group_of[i], []).append(i)
    for g, members in by_group.items():
        group = optimizer.param_groups[g]
        lr, eps = float(group["lr"]), float(group["eps"])
        beta1, beta2 = group["betas"]
        wd = float(group["weight_decay"]) if group.get("decoupled_weight_decay", False) else 0.0
        v_key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        for chunk in chunks(members, params, chunk_elements):
            st = [state[params[i]] for i in chunk]
            steps = [s["step"] for s in st]
            on_host = steps[0].device.type == "cpu" if host_steps is None else host_steps
            b1, b2 = _bias_corrections(steps, beta1, beta2, on_host)
            yield AdamChunk(
                index=chunk,
                params=[local(params[i]) for i in chunk],
                exp_avg=[local(s["exp_avg"]) for s in st],
                v=[local(s[v_key]) for s in st],
                b1=b1,
                root_b2=[math.sqrt(b) if isinstance(b, float) else b.sqrt() for b in b2],
                eps=eps,
                scale=lr / (1.0 - lr * wd),
                wd=wd,
                on_host=on_host,
            )


class GroupEps:
    """The ε each tensor's Adam/AdamW param group divides its update by, as a device column.

    Why: the agent compares √v̂ with the ε actually in force (1e-6 or 1e-15, not a configured
    1e-8).  ε is a constant of its group, so the column (and its minimum) is built once, and
    again only when a group's ``eps`` changes: one look at the groups per call, no copy to the
    device, no sync.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group_of: Sequence[int], params: Sequence[Tensor]):
        self.optimizer, self.group_of = optimizer, list(group_of)
        self.device = local(params[0]).device if params else torch.device("cpu")
        self._key: tuple[float, ...] | None = None
        self._column = self._min = torch.zeros(0)
        self._refresh()

    def _refresh(self) -> None:
        key = tuple(float(g["eps"]) for g in self.optimizer.param_groups)
        if key != self._key:
            eps = [key[g] for g in self.group_of] or [min(key, default=0.0)]
            self._column = torch.tensor(eps, dtype=torch.float32, device=self.device)
            self._min = self._column.min()
            self._key = key

    def column(self) -> Tensor:
        """Per tensor, its group's ε (float32, on the parameters' device)."""
        self._refresh()
        return self._column

    def minimum(self) -> Tensor:
        """The smallest ε over the tensors (a 0-dim tensor on the parameters' device)."""
        self._refresh()
        return self._min
