"""Roles on the wire: every parameter row and probe row of a published layout says what it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sentinel.examples.tiny_gpt import GPT, GPTConfig

import sentinel
from agent.protocol import VECTOR_ROLES
from sentinel.roles import ROLES


class Capture:
    """Stands in for the ZeroMQ publisher: keeps every (step, layout, data) published."""

    sent = dropped = 0

    def __init__(self) -> None:
        self.messages: list = []

    def publish(self, step, layout, data) -> bool:
        self.messages.append((step, layout, np.array(data, dtype=np.float32)))
        return True

    def close(self) -> None:
        pass


def attach_capturing(model: nn.Module, optimizer: torch.optim.Optimizer, **config) -> tuple:
    config.setdefault("control", {"enabled": False})
    sn = sentinel.attach(model, optimizer, publish={"endpoint": "tcp://127.0.0.1:9"}, **config)
    sn.publisher.close()
    sn.publisher = cap = Capture()
    return sn, cap


def _train_step(model, optimizer, sn, x, y=None) -> None:
    out = model(x, y) if y is not None else model(x)
    loss = out[1] if isinstance(out, tuple) else out.square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sn.observe(loss=loss)


def _param_layout(cap: Capture):
    return next(lay for _, lay, _ in cap.messages if lay.stats and "grad_l2" in lay.stats)


def test_tiny_gpt_parameter_rows_carry_their_roles() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, optimizer, probes={"enabled": True, "every": 1})
    x = torch.randint(0, 256, (2, 16))
    _train_step(model, optimizer, sn, x, x)
    sn.close()
    lay = _param_layout(cap)
    roles = dict(zip(lay.tensors, lay.roles))
    assert len(lay.roles) == len(lay.tensors)
    assert roles["h.0.ln_1.weight"] == "norm" and roles["h.0.ln_1.bias"] == "norm"
    assert roles["h.0.attn.c_attn.weight"] == "qkv" and roles["h.0.attn.c_attn.bias"] == "bias"
    assert roles["h.0.attn.c_proj.weight"] == "o" and roles["h.1.mlp.c_fc.weight"] == "up"
    assert roles["h.1.mlp.c_proj.weight"] == "down" and roles["wte.weight"] == "embedding"
    assert roles["wpe.weight"] == "pos_embedding" and roles["lm_head.weight"] == "head"
    scalar_only = [lay for _, lay, _ in cap.messages if not lay.tensors]
    assert all(lay.roles == () for lay in scalar_only)

    probes = {lay.stats[0]: dict(zip(lay.tensors, lay.roles)) for _, lay, _ in cap.messages if lay.stats}
    assert probes["out_rms"]["h.0.attn.c_attn"] == "qkv" and probes["out_rms"]["h.0.mlp.c_proj"] == "down"
    assert probes["out_rms"]["h.0.attn.c_proj"] == "o" and probes["out_rms"]["h.0.mlp.c_fc"] == "up"
    assert set(probes["attn_logit_max"].values()) == {"attention"}
    assert set(probes["resid_std"].values()) == {"block"}
    assert probes["embed_std"] == {"wte": "embedding", "wpe": "pos_embedding"}
    assert set(probes["norm_in_std"].values()) == {"norm"} and probes["log_z_mean"] == {"lm_head": "head"}


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A ViT/timm-style block: names no preset knows as such (qkv, proj, fc1, fc2, ln1, ln2)."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, 2)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gain = nn.Parameter(torch.ones(d))  # a layer-scale vector of no known name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.gain * self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Unfamiliar(nn.Module):
    def __init__(self, d: int = 16, vocab: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def test_unfamiliar_names_still_tell_matrices_from_vectors() -> None:
    torch.manual_seed(0)
    model = Unfamiliar()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, optimizer)
    _train_step(model, optimizer, sn, torch.randint(0, 32, (2, 8)))
    sn.close()
    lay = _param_layout(cap)
    shapes = dict(model.named_parameters())
    assert lay.tensors == tuple(shapes)
    for name, role in zip(lay.tensors, lay.roles):
        if shapes[name].dim() < 2:
            assert role in VECTOR_ROLES, (name, role)
        else:
            assert role and role not in VECTOR_ROLES and role in (*ROLES, "matrix"), (name, role)
    roles = dict(zip(lay.tensors, lay.roles))
    assert roles["blocks.0.ln1.weight"] == "norm" and roles["blocks.0.fc1.bias"] == "bias"
    assert roles["blocks.0.gain"] == "vector"  # a layer-scale vector: neither a norm nor a bias
    # the traced dataflow gives the matrices their roles though no preset knows these names
    assert [roles[f"blocks.1.{n}.weight"] for n in ("attn.qkv", "attn.proj", "fc1", "fc2")] == [
        "qkv",
        "o",
        "up",
        "down",
    ]
    assert (roles["emb.weight"], roles["out.weight"]) == ("embedding", "head")


def test_an_unreadable_role_map_never_reaches_the_trainer(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import sentinel.row_roles as row_roles

    def broken(*args: object) -> None:
        raise RuntimeError("injected role failure")

    monkeypatch.setattr(row_roles, "roles_from_config", broken)
    torch.manual_seed(0)
    model = Unfamiliar()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, optimizer)
    _train_step(model, optimizer, sn, torch.randint(0, 32, (2, 8)))
    sn.close()
    lay = _param_layout(cap)
    shapes = dict(model.named_parameters())
    assert lay.roles == tuple("matrix" if shapes[n].dim() >= 2 else "vector" for n in lay.tensors)
    assert "injected role failure" in caplog.text
