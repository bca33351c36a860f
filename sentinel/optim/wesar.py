"""WeSaR: weight scaling as reparameterisation (papers/001, Nishida et al., §4).

Why: to keep gradients from vanishing or exploding, initialisations give the small matrices
(W_o, W_d: residual scaling 1/√(2N)) a smaller norm, so the same Adam step moves them
relatively more; their update ratios run ahead and the run spikes (§3.3, Fig. 1).  WeSaR
trains W̄ = α·W with one trainable gate α per matrix and every actual W ~ N(0, σ²) with one
common σ (σ² = 4e-5, §4.3), so every W has the same norm and the same update ratio, while
α·W keeps the variance the initialisation wants (Table 1).  With Adam the update of W does
not depend on α (§4.2), so σ_target costs nothing in step size.

How, with hooks only: the module always holds the virtual weight W̄, so the forward pass,
inference, checkpoints of the module and Transformer Engine modules see an ordinary weight.
Before the step the tensor becomes W = W̄/α and its gradient ∂L/∂W = α·∂L/∂W̄, and the gates
get ∂L/∂α = ⟨∂L/∂W̄, W⟩; the user's optimizer updates W, and the gates (one vector) are
stepped by an AdamW of their own with the user's group-0 betas and ε and its learning rate
followed every step.  That is numerically what one more param group in the same AdamW would
do, without adding a group: LR schedulers zip their learning rates with the optimizer's
groups (strictly, in current torch), and the user's optimizer.state_dict() keeps its shape.
After the step the tensor becomes α·W again.

σ_target per role (Table 1, He initialisation with embedding and residual scaling, gain √2
for the matrix after the FFN activation), for hidden size d, FFN size d_ffn and N blocks:
  embedding 1;  q, k, v, qkv, up, gate, gate_up, head  √(1/d);
  o  √(1/(2N·d));  down  √(2/d_ffn)·√(1/(2N))  (= √(2/(8N·d)) for d_ffn = 4d).
A fused matrix (qkv, gate_up) has one gate: all its parts share the same σ_target.

Tied weights (GPT-2's ``wte``/``lm_head``) are found by storage, not by name: one Parameter
under several names gets one gate, and an embedding tied to the output head takes the head's
σ_target √(1/d), which is Table 1's He weight for W_e before the model's own embedding scaling.
With the embedding's 1 the logits would be √d times too large (GPT-2 at d=768: first loss
594 instead of 11).  Two distinct Parameters on one storage are refused, naming the pair: the
W̄ ↔ W conversion would be applied to it twice.

Sharded parameters (FSDP2, tensor parallel): the gates are one plain vector, the same on every
rank; ⟨ḡ, W̄⟩ and the 'keep' RMS are whole-matrix sums reduced across the shards
(sentinel/optim/sharded.py), and the conversions act on each rank's shard.  'wesar' init draws
each whole matrix on every rank and keeps the local shard, so it equals the unsharded draw.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from sentinel.collectives import local
from sentinel.optim.base import StepContext, Transform, host_scalars, scale_grads
from sentinel.optim.sharded import dots, shard_of, shard_sum, sq_norms

log = logging.getLogger("sentinel")

GATED_ROLES = ("embedding", "q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down", "head")


def sigma_target(role: str, d: int, d_ffn: int, n_layers: int) -> float:
    """The standard deviation WeSaR's Table 1 gives the virtual weight αW of this role."""
    if role == "embedding":
        return 1.0
    if role in ("q", "k", "v", "qkv", "up", "gate", "gate_up", "head"):
        return math.sqrt(1.0 / d)
    if role == "o":
        return math.sqrt(1.0 / (2 * n_layers * d))
    if role == "down":
        return math.sqrt(2.0 / d_ffn) * math.sqrt(1.0 / (2 * n_layers))
    raise ValueError(f"WeSaR has no gate for role {role!r}; gated roles: {', '.join(GATED_ROLES)}")


def tied_names(model: torch.nn.Module | None, params: list[Tensor]) -> dict[int, list[str]]:
    """For each of ``params`` (by index) that the model holds under more than one name, all its names.

    Raises when two distinct Parameters of the model share one storage (``data_ptr``).
    """
    if model is None:
        return {}
    names: dict[int, list[str]] = {}
    storage: dict[tuple[str, int], tuple[str, int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        if p.device.type == "meta" or p.numel() == 0:
            continue
        try:
            key = (str(p.device), p.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # wrapper tensors (DTensor) have no storage of their own
            continue
        seen = storage.setdefault(key, (name, id(p)))
        if seen[1] != id(p):
            raise ValueError(
                f"WeSaR: parameters {seen[0]!r} and {name!r} are distinct Parameters on one storage; tie them as one "
                f"Parameter (e.g. `lm_head.weight = wte.weight`) or leave them out of optim.wesar"
            )
    return {i: names[id(p)] for i, p in enumerate(params) if len(names.get(id(p), ())) > 1}


class WeSaR(Transform):
    name = "wesar"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        names: tuple[str, ...],
        roles: dict[str, str],
        *,
        d: int,
        d_ffn: int,
        n_layers: int,
        init: str = "keep",
        sigma2: float = 4e-5,
        gate_lr_scale: float = 1.0,
        gate_weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        model: torch.nn.Module | None = None,
    ):
        self.optimizer = optimizer
        self.sigma = math.sqrt(sigma2)
        self.gate_lr_scale = gate_lr_scale
        self.fused = False  # True: the module keeps W̄ through the step (sentinel/optim/fused.py)
        self._alpha_host: list = []
        self.n_params = len(params)
        self.index = [i for i, n in enumerate(names) if roles.get(n) in GATED_ROLES and params[i].dim() >= 2]
        self.params = [params[i] for i in self.index]
        self.names = [names[i] for i in self.index]
        if not self.params:
            raise ValueError("WeSaR found no matrix with a gated role; check the role map (`sentinel audit`)")
        tied = tied_names(model, params)
        self.tied = {names[i]: tied[i] for i in self.index if i in tied}
        alphas = []
        shards = shard_sum(self.params)  # sharded: whole-tensor RMS for 'keep' (one all-reduce here)
        rms_of = self._rms(shards) if init != "wesar" else {}
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                if init == "wesar":
                    role = roles[name]
                    if role == "embedding" and name in self.tied:
                        role = "head"
                        log.info(
                            "sentinel wesar: %s is tied (%s): its gate gives the head's σ_target √(1/d)",
                            name,
                            ", ".join(self.tied[name]),
                        )
                    alpha = sigma_target(role, d, d_ffn, n_layers) / self.sigma
                    if shards is None or local(p) is p:
                        actual = torch.empty_like(p).normal_(0.0, self.sigma, generator=generator)
                        p.copy_(actual * alpha)
                    else:  # the whole matrix drawn on every rank (same RNG state), this rank keeps its shard
                        full = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                        full.normal_(0.0, self.sigma, generator=generator)
                        local(p).copy_(shard_of(full, p) * alpha)
                else:
                    rms = rms_of[name]
                    if rms == 0:
                        raise ValueError(f"WeSaR init 'keep': {name} is all zeros; use init 'wesar'")
                    alpha = rms / self.sigma
                alphas.append(alpha)
        self.gates = torch.nn.Parameter(torch.tensor(alphas, dtype=self.params[0].dtype, device=self.params[0].device))
        group = optimizer.param_groups[0]
        self.gate_optimizer = torch.optim.AdamW(
            [self.gates],
            lr=self._gate_lr(),
            betas=group.get("betas", (0.9, 0.999)),
            eps=group.get("eps", 1e-8),
            weight_decay=gate_weight_decay,
            foreach=False,
        )
        log.info("sentinel wesar: %d matrices gated (init %s, σ²=%g)", len(self.params), init, sigma2)

    @torch.no_grad()
    def _rms(self, shards: Any) -> dict[str, float]:
        """RMS of every gated matrix, whole tensors (summed over the shards when ``shards``)."""
        if shards is None:
            return {n: float(p.detach().double().square().mean().sqrt()) for n, p in zip(self.names, self.params)}
        sums = torch.stack(sq_norms([p.detach() for p in self.params])).unsqueeze(1)
        total = shards(sums)[:, 0].tolist()
        return {n: (s / p.numel()) ** 0.5 for n, p, s in zip(self.names, self.params, total)}

    def sum_keys(self, ctx: StepContext) -> tuple[str, ...]:
        return ("wesar.dot",)

    def shard_sums(self, ctx: StepContext) -> dict[str, dict[int, Tensor]]:
        """⟨ḡ, W̄⟩ of every gated matrix with a gradient, over this rank's shard."""
        ks = [k for k, p in enumerate(self.params) if p.grad is not None]
        values = dots([self.params[k].grad for k in ks], [self.params[k].detach() for k in ks])
        return {"wesar.dot": {self.index[k]: v for k, v in zip(ks, values)}}

    def _gate_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) * self.gate_lr_scale

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        """Per gated matrix: one dot ⟨ḡ, W̄⟩ (reads ḡ and W̄), W̄ → W (one read and write of W),
        and ḡ → α·ḡ, which the chain merges with ε's scale into one multiply (base.scale_grads)."""
        alphas = host_scalars(self.gates.detach())
        self._alpha_host = alphas
        with_grad = [k for k, p in enumerate(self.params) if p.grad is not None]
        if with_grad:
            if ctx.sums is not None:  # sharded: the whole matrices' ⟨ḡ, W̄⟩, taken before the guard's clip
                summed = ctx.sums["wesar.dot"]
                dot = [summed[self.index[k]] * ctx.guard_scale for k in with_grad]
            else:
                dot = [
                    torch.dot(self.params[k].grad.reshape(-1), self.params[k].detach().reshape(-1)) for k in with_grad
                ]
            grad = torch.zeros_like(self.gates)
            grad[with_grad] = torch.stack(dot).to(grad.dtype) / self.gates.detach()[with_grad]
            self.gates.grad = grad
            scale_grads(ctx, [self.index[k] for k in with_grad], [alphas[k] for k in with_grad])
        else:
            self.gates.grad = torch.zeros_like(self.gates)
        if not self.fused:
            torch._foreach_div_([local(p.data) for p in self.params], alphas)

    @torch.no_grad()
    def step_gates(self) -> None:
        """The gates' own AdamW step (its gradients are complete before the weights' update)."""
        self.gate_optimizer.param_groups[0]["lr"] = self._gate_lr()  # schedulers move group 0; gates follow
        self.gate_optimizer.step()
        self.gates.grad = None

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.fused:  # the gates stepped before the update, which wrote α'·W' (sentinel/optim/fused.py)
            return
        self.step_gates()
        torch._foreach_mul_([local(p.data) for p in self.params], host_scalars(self.gates.detach()))

    def new_alpha_by_index(self) -> dict[int, Any]:
        """α' after the gates' step, by index into the optimizer's parameters."""
        return dict(zip(self.index, host_scalars(self.gates.detach())))

    def alpha_by_index(self) -> dict[int, Any]:
        """α of each gated tensor in force for the coming update, by index into the optimizer's parameters."""
        return dict(zip(self.index, self._alpha_host))

    def columns(self) -> dict[str, Tensor]:
        """α per tensor; 1 for tensors without a gate (their W̄ is W)."""
        gates = torch.ones(self.n_params, device=self.gates.device)
        gates[self.index] = self.gates.detach().float()
        return {"wesar_gate": gates}

    def gate_of(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.gates.detach().unbind()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "gates": self.gates.detach().cpu().clone(),
            "optimizer": self.gate_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("WeSaR state was saved for a different set of gated matrices")
        with torch.no_grad():
            self.gates.copy_(state["gates"])
        self.gate_optimizer.load_state_dict(state["optimizer"])
