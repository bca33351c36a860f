"""Stabilisers from the papers, as small functions and opt-in hooks on the user's own model.

Each one changes training, so none is on by default; the ``stabilise`` config section turns the
hook-based ones on for any model (:func:`apply`), and models that own their attention call the
functions directly (examples/tiny_gpt.py does).

- :func:`z_loss` -- ``coef · mean(log Z²)`` on the output logits keeps log Z near 0 so the
  softmax does not drift into float overflow (Wortsman et al. §3.2, PaLM; coef 1e-4, also used
  with WeSaR, papers/001 §5).
- :func:`qk_norm` -- layer-normalise queries and keys per head before their dot product: the
  attention logits can then not grow with the weight norms (Wortsman §3.1, Rybakov Table 3).
- :func:`softcap` -- ``tanh(logit / cap) · cap`` bounds every attention logit by ``cap``
  (Rybakov et al., cap 50).  Transformer Engine's attention has ``qk_norm_type`` but no
  soft-capping argument: for TE attention use its QK-norm; soft-capping is not available there.
- Scaled Embed (multiply the embedding output by √d) and Embed LN (layer-normalise it) give the
  shortcut a standard deviation near 1, Takase et al.'s "large shortcut" condition (papers/000
  §4): with it the per-layer gradient bound ``1 + σ1σ2/σx'·(√d+√d_ffn)²`` stays small.  Embed LN
  here has no affine parameters, so the optimizer's parameter list is unchanged.
- :func:`init_weights` -- the "small" initialisation N(0, 2/(5d)) (Nguyen & Salazar) for every
  matrix, and the "scaled" one that divides W_o and W_down by √(2N) (Takase's "small
  sub-layers" condition, §4); ``small_scaled`` is both, Takase's Vanilla.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("sentinel")

INIT_SCHEMES = ("keep", "small", "scaled", "small_scaled")


def z_loss(logits: Tensor, coef: float = 1e-4) -> Tensor:
    """``coef · mean(logsumexp(logits)²)`` over every position: add it to the training loss."""
    log_z = torch.logsumexp(logits.float(), dim=-1)
    return coef * log_z.square().mean()


def softcap(logits: Tensor, cap: float = 50.0) -> Tensor:
    """``tanh(logits / cap) · cap``: smooth, monotone, and bounded by ``cap`` in absolute value."""
    if cap <= 0:
        raise ValueError(f"softcap: cap must be > 0, got {cap}")
    return torch.tanh(logits / cap) * cap


def qk_norm(q: Tensor, k: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Layer-normalise queries and keys over the head dimension (the last one), without parameters."""
    return F.layer_norm(q, q.shape[-1:], eps=eps), F.layer_norm(k, k.shape[-1:], eps=eps)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    qk_normalise: bool = False,
    cap: float | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention over ``(B, H, T, Dh)`` with optional QK-norm and soft-capping.

    Without soft-capping it is ``F.scaled_dot_product_attention`` (fused kernels); soft-capping
    needs the logits, so that path computes them explicitly.
    """
    if qk_normalise:
        q, k = qk_norm(q, k)
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = softcap((q @ k.transpose(-2, -1)) * scale, cap)
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype) @ v


@torch.no_grad()
def init_weights(
    model: torch.nn.Module, roles: dict[str, str], scheme: str, *, d: int, n_layers: int, generator: Any = None
) -> list[str]:
    """Re-initialise the matrices with a role per ``scheme``; returns the names changed.

    ``small``: every matrix (embeddings included) ~ N(0, 2/(5d)).  ``scaled``: W_o and W_down
    divided by √(2N) from their current values.  ``small_scaled``: both.  ``keep``: nothing.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
    changed = []
    std = math.sqrt(2.0 / (5.0 * d))
    for name, p in model.named_parameters():
        role = roles.get(name)
        if role is None or p.dim() < 2 or role in ("norm", "bias"):
            continue
        touched = False
        if scheme in ("small", "small_scaled"):
            p.normal_(0.0, std, generator=generator)
            touched = True
        if scheme in ("scaled", "small_scaled") and role in ("o", "down"):
            p.div_(math.sqrt(2.0 * n_layers))
            touched = True
        if touched:
            changed.append(name)
    return changed


def _scale_output(factor: float):
    def hook(module: torch.nn.Module, args: Any, output: Tensor) -> Tensor:
        return output * factor

    return hook


def _layer_norm_output(module: torch.nn.Module, args: Any, output: Tensor) -> Tensor:
    return F.layer_norm(output, output.shape[-1:])


@dataclass
class Applied:
    """What :func:`apply` did, so it can be logged and undone (``remove``)."""

    hooks: list[Any] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def apply(model: torch.nn.Module, config: Any, role_map: Any) -> Applied:
    """Apply the ``stabilise`` section to ``model``: initialisation, then embedding hooks.

    ``role_map`` is a :class:`sentinel.roles.RoleMap`; embeddings are found by role, so it works
    on any model the role map covers (``sentinel audit`` shows it).
    """
    out = Applied()
    if config.scaled_embed and config.embed_ln:
        raise ValueError("stabilise: scaled_embed and embed_ln are alternatives; turn on one")
    d, n_layers = role_map.d_model, role_map.n_layers
    if config.init != "keep":
        if d is None or n_layers is None:
            raise ValueError("stabilise.init needs d and N, which the role map could not infer")
        out.initialised = init_weights(model, role_map.role_by_name(), config.init, d=d, n_layers=n_layers)
        out.notes.append(f"init {config.init}: {len(out.initialised)} matrices (d={d}, N={n_layers})")
    if config.scaled_embed or config.embed_ln:
        names = {n.rsplit(".", 1)[0] for n in role_map.names("embedding")}
        modules = [m for n, m in model.named_modules() if n in names]
        if not modules:
            raise ValueError("stabilise: no module with the embedding role to hook")
        for m in modules:
            if config.scaled_embed:
                width = d or m.weight.shape[-1]
                out.hooks.append(m.register_forward_hook(_scale_output(math.sqrt(width))))
            else:
                out.hooks.append(m.register_forward_hook(_layer_norm_output))
        what = "scaled embed (×√d)" if config.scaled_embed else "embed LN"
        out.notes.append(f"{what} on {', '.join(sorted(names))}")
    for note in out.notes:
        log.warning("sentinel stabilise: %s (changes training, as configured)", note)
    return out


def use_in_hf_model(model: Any, *, qk_normalise: bool = False, cap: float | None = None) -> str:
    """Make a Hugging Face ``transformers`` model's attention apply QK-norm and/or soft-capping.

    Registers an attention implementation (``AttentionInterface``, with ``sdpa``'s mask
    builder) and switches ``model`` to it; returns its name.  Without ``cap`` it is ``sdpa`` on
    normalised queries and keys; with ``cap`` the logits are computed explicitly.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if cap is not None and cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    name = f"sentinel_qk{int(qk_normalise)}_cap{cap}"

    def forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any):
        if qk_normalise:
            query, key = qk_norm(query, key)
        if cap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scaling = kwargs.get("scaling") or 1.0 / math.sqrt(query.shape[-1])
        logits = softcap((query @ key.transpose(-2, -1)) * scaling, cap)
        if attention_mask is None and getattr(module, "is_causal", True) and query.shape[-2] > 1:
            t_q, t_k = query.shape[-2], key.shape[-2]
            attention_mask = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, float("-inf"))
            else:
                logits = logits + attention_mask[..., : key.shape[-2]]
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(value.dtype)
        probs = probs.nan_to_num(0.0)  # a fully masked row (left padding) attends to nothing, as in sdpa
        probs = F.dropout(probs, p=kwargs.get("dropout", 0.0), training=module.training)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    log.warning(
        "sentinel stabilise: %s attention uses %s (changes training, as configured)", type(model).__name__, name
    )
    return name
