"""Forward probes on Transformer Engine layers: the logit probe reads ``DotProductAttention``'s
q and k, the linear probes read TE's fused modules.

Skipped without CUDA or without ``transformer_engine``. Run on a GPU machine with TE installed:
``python -m pytest tests/gpu/test_te_probes.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sentinel.probes import Probes
from sentinel.roles import assign_roles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
te = pytest.importorskip("transformer_engine.pytorch")

S, B, D, H, FFN, V = 24, 2, 64, 4, 256, 96


class TeGPT(torch.nn.Module):
    """Embedding, two te.TransformerLayer blocks (sbhd), te.LayerNorm, head."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList(
            te.TransformerLayer(
                D,
                FFN,
                H,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                self_attn_mask_type="causal",
                layer_number=i + 1,
                params_dtype=torch.float32,
            )  # fmt: skip
            for i in range(2)
        )
        self.ln_f = te.LayerNorm(D, params_dtype=torch.float32)
        self.lm_head = torch.nn.Linear(D, V, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx).transpose(0, 1).contiguous()  # [s, b, d]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x).transpose(0, 1))


def test_te_transformer_layer_probes_equal_direct_computations():
    torch.manual_seed(0)
    model = TeGPT().cuda()
    seen = {}
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "DotProductAttention":

            def hook(m, args, kwargs, name=name):
                q = args[0] if args else kwargs["query_layer"]
                k = args[1] if len(args) > 1 else kwargs["key_layer"]
                seen.setdefault(name, (q.detach().clone(), k.detach().clone()))

            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    probes = Probes(model, assign_roles(model, preset="te"), every=1, sample=S)
    assert set(probes.plan.attentions) == {"layers.0.self_attention", "layers.1.self_attention"}
    assert probes.plan.linears["layers.0.layernorm_mlp"] == "FC2"
    probes.begin_step(0)
    idx = torch.randint(0, V, (B, S), device="cuda")
    model(idx).float().logsumexp(-1).mean().backward()
    groups = {lay.stats: (lay, packed) for lay, packed in probes.collect()}
    assert probes.errors == 0
    for h in handles:
        h.remove()
    lay, packed = next(v for k, v in groups.items() if k[0] == "attn_logit_max")
    matrix = packed.reshape(len(lay.tensors), len(lay.stats))
    for i in range(2):
        q, k = seen[f"layers.{i}.self_attention.core_attention"]
        q, k = q.permute(1, 2, 0, 3).float(), k.permute(1, 2, 0, 3).float()  # sbhd -> bhsd
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        logits = logits.masked_fill(~torch.ones(S, S, dtype=torch.bool, device="cuda").tril(), float("-inf"))
        row = lay.tensors.index(f"layers.{i}.self_attention")
        torch.testing.assert_close(matrix[row, 0], logits.max(), rtol=1e-3, atol=1e-3)
    lay, packed = groups[("out_rms", "out_l2")]
    assert {"layers.0.self_attention.layernorm_qkv", "layers.0.self_attention.proj", "layers.1.layernorm_mlp"} <= set(
        lay.tensors
    )
    assert torch.isfinite(packed).all()
    assert any("ffn_grad_bound" in stats for stats in groups)
