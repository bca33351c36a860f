"""Transformer Engine's ``DotProductAttention`` interface on CPU: the structural trace and the logit
probe read its arguments as TE passes them (``query_layer``, ``key_layer``, ``value_layer`` in
``sbhd``/``bshd``, ``attn_mask_type``, ``window_size``, the backends' ``softmax_scale``).

TE itself needs CUDA (tests/gpu/test_te_probes.py runs the real modules); here a module of the same
class name and forward signature stands in, computing attention by explicit math, so the values
the probe reports can be checked against q·k computed directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sentinel.probes import Probes
from sentinel.roles import assign_roles

S, B, H, HD, V = 12, 2, 4, 8, 40
D = H * HD


def _allowed(q_len: int, k_len: int, window: tuple[int, int]) -> torch.Tensor:
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    left, right = window
    ok = j <= i if right < 0 and left < 0 else torch.ones(q_len, k_len, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


class _Unfused(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.softmax_scale = scale


class DotProductAttention(nn.Module):
    """TE's class name and forward signature; sbhd tensors; math inside."""

    def __init__(self, scale: float, window: tuple[int, int] = (-1, 0)):
        super().__init__()
        self.qkv_format, self.attn_mask_type, self.window_size = "sbhd", "causal", window
        self.unfused_attention = _Unfused(scale)

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format=None,
                attn_mask_type=None, window_size=None):  # fmt: skip
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))  # sbhd -> bhsd
        logits = (q @ k.transpose(-1, -2)) * self.unfused_attention.softmax_scale
        allowed = _allowed(q.shape[-2], k.shape[-2], window_size or self.window_size)
        w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return (w @ v).permute(2, 0, 1, 3).reshape(q.shape[-2], q.shape[0], -1)


class Block(nn.Module):
    def __init__(self, scale: float, window: tuple[int, int]):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.lin_qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.core = DotProductAttention(scale, window)

    def forward(self, x):  # x: sbh
        s, b, _ = x.shape
        q, k, v = self.lin_qkv(self.norm(x)).view(s, b, H, 3 * HD).split(HD, dim=-1)
        return x + self.out(self.core(q, k, v, attn_mask_type="causal"))


class TeStyleGPT(nn.Module):
    def __init__(self, scale: float = 0.3, window: tuple[int, int] = (-1, 0)):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(scale, window) for _ in range(2))
        self.lm = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.tok(ids).transpose(0, 1)
        for b in self.blocks:
            x = b(x)
        return self.lm(x.transpose(0, 1))


def test_the_trace_reads_q_k_v_from_the_module_arguments():
    rm = assign_roles(TeStyleGPT())
    assert [a.kind for a in rm.structure.attentions] == ["module", "module"]
    roles = {n: r.role for n, r in rm.items() if r.is_matrix}
    assert roles == {"tok.weight": "embedding", "lm.weight": "head"} | {
        f"blocks.{i}.{n}.weight": r for i in range(2) for n, r in (("lin_qkv", "qkv"), ("out", "o"))
    }
    parts = rm["blocks.0.lin_qkv.weight"].fused_parts  # per head: q, k, v of that head
    assert (parts.sizes, parts.layout, parts.groups) == ((D, D, D), "interleaved", H)


@pytest.mark.parametrize("window", [(-1, 0), (3, 0)])
def test_the_logit_probe_uses_the_scale_mask_and_window_te_uses(window):
    torch.manual_seed(0)
    model = TeStyleGPT(scale=0.3, window=window)
    probes = Probes(model, assign_roles(model), every=1, sample=S)
    seen = {}

    def keep(i):
        def hook(module, args):
            seen.setdefault(i, (args[0].detach(), args[1].detach()))  # returns None: the args stay

        return hook

    hooks = [b.core.register_forward_pre_hook(keep(i)) for i, b in enumerate(model.blocks)]
    probes.begin_step(0)
    ids = torch.randint(0, V, (B, S))
    model(ids).square().mean().backward()
    for h in hooks:
        h.remove()
    [(layout, packed)] = [(lay, p) for lay, p in probes.collect() if "attn_logit_max" in lay.stats]
    got = packed.reshape(len(layout.tensors), len(layout.stats))[:, layout.stats.index("attn_logit_max")]
    differs = False
    for i, value in enumerate(got.tolist()):
        q, k = (t.permute(1, 2, 0, 3) for t in seen[i])
        logits = (q @ k.transpose(-1, -2)) * 0.3
        want = logits.masked_fill(~_allowed(S, S, window), float("-inf")).max().item()
        causal = logits.masked_fill(~_allowed(S, S, (-1, 0)), float("-inf")).max().item()
        differs |= want != causal
        assert value == pytest.approx(want, rel=1e-5), (i, window)
    assert differs == (window != (-1, 0))  # the window case really masks the causal maximum out
    assert probes.errors == 0 and not math.isnan(float(got.sum()))
