"""The largest attention logit q·k·scale, computed from the q and k an attention call receives.

Wortsman et al. (papers/003 §3.1.1) watch the max attention logit: runs whose logits pass
about 1e4 diverge.  Kernels (SDPA, flash, cuDNN) never materialise the logits, so the probe
recomputes them for a *sample of query positions*: ``sample`` positions evenly spaced over
the sequence, first and last included (``positions``).  Each sampled query is scored against
every key, with the causal or explicit mask applied, so a sampled row is exact; the cost is
``sample / L`` of the attention's own QKᵀ, bounded for long sequences, and the result is exact
when ``sample >= L``.  The value is a lower bound of the true maximum otherwise.

Three ways in, all yielding the per-head maximum (a ``(heads,)`` float32 tensor):

* :func:`sdpa_head_max` for callers of ``torch.nn.functional.scaled_dot_product_attention``
  (the tiny GPT, Hugging Face ``sdpa``), caught by :class:`AttentionCapture`, a
  ``TorchFunctionMode`` that is active only inside an armed attention module;
* :func:`scores_head_max` for eager implementations that call ``softmax`` on the logits
  (Hugging Face ``eager``: the softmax input is the masked, scaled logit matrix);
* :func:`te_head_max` for Transformer Engine's ``DotProductAttention`` (inside
  ``MultiheadAttention`` and ``TransformerLayer``), from the arguments of its forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCapture", "positions", "scores_head_max", "sdpa_head_max", "te_head_max"]

_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)
_SDPA = F.scaled_dot_product_attention


def positions(length: int, sample: int, device: torch.device) -> torch.Tensor:
    """Query positions probed: all of them when ``sample >= length``, else ``sample`` evenly spaced."""
    if sample >= length:
        return torch.arange(length, device=device)
    idx = torch.linspace(0, length - 1, sample, device=device).round().long()
    return torch.unique(idx)


def _per_head(logits: torch.Tensor) -> torch.Tensor:
    """Max over everything but the head dimension (-3) of ``[..., heads, queries, keys]``."""
    head = logits.dim() - 3
    return logits.amax(dim=tuple(d for d in range(logits.dim()) if d != head))


def _rows(mask: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    if mask.dim() >= 2 and mask.shape[-2] == length:
        return mask.index_select(-2, idx)
    return mask


def sdpa_head_max(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    sample: int = 64,
    bottom_right: bool = False,
    mask_keeps: bool = True,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-head max logit of SDPA-shaped ``query [..., H, L, E]`` and ``key [..., Hk, S, E]``.

    Follows SDPA's conventions: ``scale`` defaults to 1/√E, ``is_causal`` is aligned top left
    (query i sees keys j ≤ i; ``bottom_right`` shifts it by S − L), a boolean ``attn_mask``
    is True where attention is allowed (``mask_keeps=False`` flips that, Transformer Engine's
    convention) and a float mask is added.  Grouped-query keys are repeated across heads.
    ``window`` (left, right) is Transformer Engine's sliding window: query i sees keys j with
    i + S − L − left ≤ j ≤ i + S − L + right, −1 meaning unbounded on that side.
    """
    q_len, k_len, heads = query.shape[-2], key.shape[-2], query.shape[-3]
    idx = positions(q_len, sample, query.device)
    q = query.detach().index_select(-2, idx).float()
    k = key.detach().float()
    if k.shape[-3] != heads:
        k = k.repeat_interleave(heads // k.shape[-3], dim=-3)
    s = (1.0 / math.sqrt(query.shape[-1])) if scale is None else float(scale)
    logits = torch.matmul(q, k.transpose(-2, -1)) * s
    if is_causal:
        shift = k_len - q_len if bottom_right else 0
        allowed = torch.arange(k_len, device=q.device)[None, :] <= (idx[:, None] + shift)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if window is not None and tuple(window) not in ((-1, -1), (-1, 0)):
        left, right = window
        pos = idx[:, None] + (k_len - q_len)
        keys = torch.arange(k_len, device=q.device)[None, :]
        allowed = torch.ones_like(keys, dtype=torch.bool) & (keys >= pos - left if left >= 0 else True)
        if right >= 0:
            allowed = allowed & (keys <= pos + right)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        m = _rows(attn_mask.detach(), idx, q_len)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m if mask_keeps else m, float("-inf"))
        else:
            logits = logits + m.float()
    return _per_head(logits)


def scores_head_max(scores: torch.Tensor, sample: int = 64) -> torch.Tensor:
    """Per-head max of an already computed logit matrix ``[..., H, L, S]`` (a softmax input)."""
    idx = positions(scores.shape[-2], sample, scores.device)
    return _per_head(scores.detach().index_select(-2, idx).float())


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class AttentionCapture(TorchFunctionMode):
    """Sees the torch calls made inside one attention module's forward and keeps the first
    attention it recognises: an SDPA call, or a softmax over the last dim of a 4-D tensor."""

    def __init__(self, sample: int):
        super().__init__()
        self.sample = sample
        self.result: torch.Tensor | None = None
        self.seq_len: int | None = None
        self.error: BaseException | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.result is None and self.error is None:
            try:
                self._see(func, args, kwargs)
            except Exception as exc:  # a probe must never break the forward
                self.error = exc
        return out

    def _see(self, func, args: tuple, kwargs: dict) -> None:
        if func is _SDPA:
            q, k = args[0] if args else kwargs["query"], _arg(args, kwargs, 1, "key")
            with torch.no_grad():
                self.result = sdpa_head_max(
                    q,
                    k,
                    attn_mask=_arg(args, kwargs, 3, "attn_mask"),
                    is_causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
                    scale=_arg(args, kwargs, 6, "scale"),
                    sample=self.sample,
                )
            self.seq_len = int(k.shape[-2])
        elif func in _SOFTMAXES:
            x = args[0] if args else kwargs.get("input")
            dim = _arg(args, kwargs, 1, "dim")
            if isinstance(x, torch.Tensor) and x.dim() == 4 and dim in (-1, 3) and x.is_floating_point():
                with torch.no_grad():
                    self.result = scores_head_max(x, self.sample)
                self.seq_len = int(x.shape[-1])


_TE_FORMATS = {"sbhd": (1, 2, 0, 3), "bshd": (0, 2, 1, 3)}


def te_head_max(module: torch.nn.Module, args: tuple, kwargs: dict, sample: int) -> tuple[torch.Tensor, int] | None:
    """Per-head max logit from the arguments of a Transformer Engine ``DotProductAttention.forward``
    (query_layer, key_layer, value_layer, attention_mask, qkv_format, ..., attn_mask_type, ...),
    and the key length; None for layouts it cannot read (packed ``thd``, ``qkv_layer`` inputs).

    ``attention_mask`` follows TE's convention (True = masked out); a (q, kv) tuple of padding
    masks contributes its key mask.  The scale is the module's ``softmax_scale`` (older TE) or
    that of its ``unfused_attention`` backend, else 1/√head_dim.
    """
    q = _arg(args, kwargs, 0, "query_layer")
    k = _arg(args, kwargs, 1, "key_layer")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return None
    fmt = kwargs.get("qkv_format") or getattr(module, "qkv_format", "sbhd")
    if fmt not in _TE_FORMATS or q.dim() != 4:
        return None
    q, k = q.permute(*_TE_FORMATS[fmt]), k.permute(*_TE_FORMATS[fmt])
    mask_type = (kwargs.get("attn_mask_type") or getattr(module, "attn_mask_type", "causal")).replace(",", "_")
    mask = _arg(args, kwargs, 3, "attention_mask")
    if isinstance(mask, (tuple, list)):
        mask = mask[-1]
    if mask_type in ("causal", "no_mask", "causal_bottom_right"):
        mask = None
    scale = getattr(module, "softmax_scale", None)
    if scale is None:
        scale = getattr(getattr(module, "unfused_attention", None), "softmax_scale", None)
    window = kwargs.get("window_size") or getattr(module, "window_size", None)
    with torch.no_grad():
        per_head = sdpa_head_max(
            q,
            k,
            attn_mask=mask if isinstance(mask, torch.Tensor) else None,
            is_causal="causal" in mask_type,
            scale=scale,
            sample=sample,
            bottom_right="bottom_right" in mask_type,
            mask_keeps=False,
            window=tuple(window) if isinstance(window, (tuple, list)) and len(window) == 2 else None,
        )
    return per_head, int(k.shape[-2])
