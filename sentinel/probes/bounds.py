"""Takase et al.'s per-layer upper bounds of the gradient norm (papers/000, eq. 15 and 20).

For a pre-LN layer, with σ the standard deviation of a weight matrix and of an activation:

* FFN (eq. 15):       ‖∂y/∂x′‖ ≤ 1 + σ1·σ2/σx′ · (√d + √d_ffn)²
* attention (eq. 20): ‖∂x′/∂x‖ ≤ 1 + σO/σx · 2√d · ‖J_Z‖

σ1, σ2 and σO are the live standard deviations of W1 (up; gate and up together for gated
MLPs), W2 (down) and WO; σx is the std of the layer input (the residual stream), σx′ that of
the FFN's input before its normalisation (x′ = x + Attn(LN(x))).  ‖W‖₂ ≈ σ(√rows + √cols)
(§3.1), so the bounds track how the weights and the shortcut's scale move during training: a
bound far above 1 says the "small sub-layers" or "large shortcut" condition (§4) is broken.

‖J_Z‖, the spectral norm of the Jacobian of the concatenated heads, has no closed form; the
probe uses the paper's own estimate (Appendix I, eq. 52), which assumes Q, K and V weights of
one common std σ (the live std of all of them together here) and near-uniform attention over
L positions (the live sequence length):

    ‖J_Z‖ ≈ h · ((√L + 2 + 1/√L) · σ³ · √(d³·d_head) + σ · (√d + √d_head))

It ignores the actual attention pattern (peaked attention makes the true Jacobian smaller), so
read the attention bound as a scale indicator, like the paper's Figure 2, not a measurement.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_bound", "ffn_bound", "jz_estimate", "weight_std"]


def weight_std(weights: list[torch.Tensor]) -> torch.Tensor:
    """Population std of all elements of ``weights`` together (a 0-d float32 tensor, no host sync).

    Under FSDP2 a ``DTensor`` contributes its local shard: a sample of the same distribution.
    """
    total = count = None
    total_sq = None
    n = 0
    for w in weights:
        w = w.detach()
        if hasattr(w, "to_local"):
            w = w.to_local()
        if w.numel() == 0:
            continue
        wf = w.float()
        s, sq = wf.sum(), wf.square().sum()
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += w.numel()
    if total is None:
        raise ValueError("no weights to take a std of")
    count = float(n)
    mean = total / count
    return (total_sq / count - mean * mean).clamp_min(0.0).sqrt()


def ffn_bound(s1: torch.Tensor, s2: torch.Tensor, sx: torch.Tensor, d: int, d_ffn: int) -> torch.Tensor:
    """Eq. 15: 1 + σ1σ2/σx′ · (√d + √d_ffn)²."""
    return 1.0 + s1 * s2 / sx * (math.sqrt(d) + math.sqrt(d_ffn)) ** 2


def jz_estimate(sigma: torch.Tensor, d: int, heads: int, seq_len: int) -> torch.Tensor:
    """Appendix I, eq. 52: h·((√L + 2 + 1/√L)·σ³·√(d³·d_head) + σ·(√d + √d_head))."""
    d_head = d / heads
    root_l = math.sqrt(seq_len)
    first = (root_l + 2.0 + 1.0 / root_l) * sigma**3 * math.sqrt(d**3 * d_head)
    return heads * (first + sigma * (math.sqrt(d) + math.sqrt(d_head)))


def attention_bound(so: torch.Tensor, sx: torch.Tensor, d: int, jz: torch.Tensor) -> torch.Tensor:
    """Eq. 20: 1 + σO/σx · 2√d · ‖J_Z‖."""
    return 1.0 + so / sx * 2.0 * math.sqrt(d) * jz
