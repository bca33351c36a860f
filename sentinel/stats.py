"""Per-tensor optimizer statistics, reduced on the device into one packed tensor.

Why these statistics: the update ratio ‖ΔW‖/‖W‖ and its spread across matrices is the
precursor of loss spikes in WeSaR (papers/001, §3); the RMS of the gradient and of Adam's
√v̂ against ε shows the update-shrinking regime of Wortsman et al. (papers/003, §3.4).

How: every reduction is a ``torch._foreach_*`` call over chunks of at most
``chunk_elements`` elements, and the result is one (tensors x stats) tensor on the device,
so the host sees one transfer per publish.  For Adam and AdamW the update is rebuilt from
the optimizer's state after the step instead of copying the parameters before it:

    u    = m̂ / (√v̂ + ε)                 (m̂, v̂ bias-corrected; v̂ from max_exp_avg_sq with amsgrad)
    c    = 1 - lr·wd  (AdamW),  1  (Adam: its weight decay is already inside m̂)
    ΔW   = -(lr / c) · (u + wd·W_new)    ‖W_old‖ = ‖W_new - ΔW‖

which needs one scratch list the size of a chunk, not a copy of the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

GRAD = ("grad_l2", "grad_rms", "param_l2")
UPDATE = ("update_l2", "update_ratio")
ADAM = ("sqrt_v_rms", "sqrt_v_below_eps_fraction")


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Adam and AdamW (foreach, fused or for-loop): the optimizers whose update we can rebuild."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)


def _chunks(items: Sequence[int], params: Sequence[Tensor], max_elements: int) -> Iterator[list[int]]:
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


def _bias_correction(steps: list[Tensor], beta: float) -> list:
    """1 - beta**step per tensor: floats for CPU step counters, 0-dim device tensors otherwise (no sync)."""
    return [1.0 - beta ** float(s) if s.device.type == "cpu" else 1.0 - beta**s for s in steps]


class TensorStats:
    """Computes the statistics of the optimizer's parameters after a step.

    ``mode`` is 'reconstruct' (Adam/AdamW only), 'copy' (snapshot before the step on
    statistics steps: costs one copy of the parameters while the step runs) or 'off'.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str], mode: str, chunk_elements: int):
        self.optimizer = optimizer
        self.mode = mode
        self.chunk_elements = chunk_elements
        self.params: list[Tensor] = []
        self.group_of: list[int] = []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self.params.append(p)
                    self.group_of.append(g)
        self.names = tuple(
            names.get(id(p), f"group{g}.param{i}") for i, (p, g) in enumerate(zip(self.params, self.group_of))
        )
        self.adam = is_adam(optimizer)
        self.stats = GRAD + (UPDATE if mode != "off" else ()) + (ADAM if self.adam else ())
        self._before: list[Tensor] | None = None

    @property
    def snapshot_bytes(self) -> int:
        """Extra memory the 'copy' mode holds during a statistics step."""
        return sum(p.numel() * p.element_size() for p in self.params) if self.mode == "copy" else 0

    def before_step(self) -> None:
        if self.mode == "copy":
            with torch.no_grad():
                self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> tuple[Tensor, Tensor]:
        """Return (stats matrix [tensors x stats], global grad L2 norm), both on the device."""
        params = self.params
        n = len(params)
        device = params[0].device
        zero = torch.zeros((), device=device)
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        grad_l2 = [zero] * n
        if with_grad:
            for i, v in zip(with_grad, torch._foreach_norm([params[i].grad for i in with_grad])):
                grad_l2[i] = v
        numel = torch.tensor([p.numel() for p in params], device=device, dtype=torch.float32)
        g = torch.stack(grad_l2).float()
        param_l2 = list(torch._foreach_norm(params))
        columns = {"grad_l2": g, "grad_rms": g / numel.sqrt()}
        update_l2, old_l2 = [zero] * n, list(param_l2)
        root_v, below, root_bc2 = [zero] * n, [zero] * n, [1.0] * n
        if self.mode == "copy":
            self._copy_update(update_l2, old_l2)
        if self.adam:
            self._adam(with_grad, update_l2, old_l2, root_v, below, root_bc2)
        columns["param_l2"] = torch.stack(param_l2).float()
        if self.mode != "off":
            update, old = torch.stack(update_l2).float(), torch.stack(old_l2).float()
            columns["update_l2"] = update
            columns["update_ratio"] = torch.where(old > 0, update / old, torch.zeros_like(old))  # 0 for an all-zero W
        if self.adam:
            root_b2 = torch.tensor(root_bc2, device=device) if isinstance(root_bc2[0], float) else torch.stack(root_bc2)
            columns["sqrt_v_rms"] = torch.stack(root_v).float() / (numel.sqrt() * root_b2)
            columns["sqrt_v_below_eps_fraction"] = torch.stack(below).float() / numel
        matrix = torch.stack([columns[s] for s in self.stats], dim=1)
        return matrix, g.square().sum().sqrt()

    def _copy_update(self, update_l2: list[Tensor], old_l2: list[Tensor]) -> None:
        before, self._before = self._before, None
        if before is None:
            return
        params = self.params
        for chunk in _chunks(range(len(params)), params, self.chunk_elements):
            delta = torch._foreach_sub([params[i] for i in chunk], [before[i] for i in chunk])
            for i, d, o in zip(chunk, torch._foreach_norm(delta), torch._foreach_norm([before[i] for i in chunk])):
                update_l2[i], old_l2[i] = d, o

    def _adam(
        self,
        with_grad: list[int],
        update_l2: list[Tensor],
        old_l2: list[Tensor],
        root_v: list,
        below: list,
        root_bc2: list,
    ) -> None:
        """One pass over Adam's state per chunk: ‖√v‖ and √b2, the count of √v̂ < ε, and (reconstruct) ‖ΔW‖, ‖W_old‖.

        With b1 = 1-β1^t, b2 = 1-β2^t, s = lr/(1-lr·wd) and D = √v + ε·√b2:
          Σv̂ = ‖√v‖²/b2;   √v̂ < ε  ⇔  √v < ε·√b2;   -ΔW = s·wd·W + s·(√b2/b1)·m/D;   W_old = W + (-ΔW).
        The count is an L0 norm of min(√v - ε·√b2, 0): three batched ops, no per-tensor loop.
        """
        params, state = self.params, self.optimizer.state
        by_group: dict[int, list[int]] = {}
        for i in with_grad:
            if "exp_avg_sq" in state.get(params[i], {}):
                by_group.setdefault(self.group_of[i], []).append(i)
        for g, members in by_group.items():
            group = self.optimizer.param_groups[g]
            lr, eps = float(group["lr"]), float(group["eps"])
            beta1, beta2 = group["betas"]
            wd = float(group["weight_decay"]) if group.get("decoupled_weight_decay", False) else 0.0
            scale = lr / (1.0 - lr * wd)
            v_key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
            for chunk in _chunks(members, params, self.chunk_elements):
                st = [state[params[i]] for i in chunk]
                steps = [s["step"] for s in st]
                b1, b2 = _bias_correction(steps, beta1), _bias_correction(steps, beta2)
                root_b2 = [math.sqrt(b) if isinstance(b, float) else b.sqrt() for b in b2]
                eps_root_b2 = [eps * r for r in root_b2]
                d = torch._foreach_sqrt([s[v_key] for s in st])
                diff = torch._foreach_sub(d, eps_root_b2)
                torch._foreach_clamp_max_(diff, 0.0)
                for i, norm, count, r in zip(chunk, torch._foreach_norm(d), torch._foreach_norm(diff, 0), root_b2):
                    root_v[i], below[i], root_bc2[i] = norm, count, r
                del diff
                if self.mode != "reconstruct":
                    continue
                torch._foreach_add_(d, eps_root_b2)
                w = [params[i] for i in chunk]
                u = torch._foreach_mul(w, scale * wd) if wd else [torch.zeros_like(p) for p in w]
                coef = [scale * r / b for r, b in zip(root_b2, b1)]
                torch._foreach_addcdiv_(
                    u, [s["exp_avg"] for s in st], d, coef if isinstance(coef[0], float) else torch.stack(coef)
                )
                del d
                for i, norm in zip(chunk, torch._foreach_norm(u)):
                    update_l2[i] = norm
                torch._foreach_add_(u, w)  # u is now W_old
                for i, norm in zip(chunk, torch._foreach_norm(u)):
                    old_l2[i] = norm
