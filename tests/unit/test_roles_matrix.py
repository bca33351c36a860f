"""The role and probe matrix: every architecture of tests/model_zoo.py, names as built and scrambled.

Each case asserts the complete role map of the weight matrices (no matrix without a role, each
the right one), an attention found in every block by the traced dataflow, and, after one real
training forward/backward, an ``attn_logit_max`` row for every block.  docs/roles.md shows the
same matrix as a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_zoo import LAYERS, ZOO, scramble  # noqa: E402

from sentinel.model_call import example_ids, forward_loss  # noqa: E402
from sentinel.probes import Probes  # noqa: E402
from sentinel.roles import assign_roles  # noqa: E402

CASES = [(name, scrambled) for name in ZOO for scrambled in (False, True)]


@pytest.mark.parametrize(("name", "scrambled"), CASES, ids=[f"{n}-{'scrambled' if s else 'named'}" for n, s in CASES])
def test_roles_and_attention_probes(name: str, scrambled: bool) -> None:
    build, expected = ZOO[name]
    model = build()
    back = scramble(model) if scrambled else {n: n for n, _ in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    rm = assign_roles(model)
    assert torch.equal(torch.get_rng_state(), rng), "the trace moved the RNG"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the trace changed a weight"
    assert model.training, "the trace left the model in eval mode"

    got = {back[n]: r.role for n, r in rm.items() if r.is_matrix}
    assert rm.unassigned == []
    assert got == expected
    assert not any(r.role not in ("norm", "bias") for r in rm.values() if not r.is_matrix)
    assert rm.structure is not None and rm.structure.error is None
    assert len(rm.structure.attentions) == LAYERS
    assert rm.n_layers == LAYERS
    if scrambled:  # no name says anything: layers come from the order of the attention calls
        layers = sorted({r.layer for r in rm.values() if r.role in ("q", "qkv", "down")})
        assert layers == list(range(LAYERS))

    probes = Probes(model, rm, every=1, sample=8)
    assert len(probes.plan.attentions) == LAYERS
    probes.begin_step(0)
    ids = example_ids(model, seq=8, batch=2)
    forward_loss(model, ids).backward()
    rows = {}
    for layout, packed in probes.collect():
        if "attn_logit_max" in layout.stats:
            matrix = packed.reshape(len(layout.tensors), len(layout.stats))
            rows = dict(zip(layout.tensors, matrix[:, layout.stats.index("attn_logit_max")].tolist()))
    assert set(rows) == set(probes.plan.attentions) and all(torch.isfinite(torch.tensor(v)) for v in rows.values())
    assert probes.errors == 0


def test_fused_splits_come_from_the_dataflow() -> None:
    """GPT-NeoX orders its fused QKV per head (q, k, v of head 0, then head 1...): interleaved."""
    rm = assign_roles(ZOO["hf_gpt_neox"][0]())
    parts = rm["gpt_neox.layers.0.attention.query_key_value.weight"].fused_parts
    assert (parts.sizes, parts.layout, parts.groups, parts.dim) == ((32, 32, 32), "interleaved", 4, 0)
    rm = assign_roles(ZOO["hf_mixtral"][0]())
    parts = rm["model.layers.0.mlp.experts.gate_up_proj"].fused_parts
    assert (parts.names, parts.sizes, parts.dim) == (("gate", "up"), (48, 48), 1)
    assert rm.d_ffn == 48
    rm = assign_roles(ZOO["plain_qkv_proj_fc"][0]())
    parts = rm["blocks.0.attn.qkv.weight"].fused_parts
    assert (parts.sizes, parts.layout) == ((32, 32, 32), "contiguous") and "traced dataflow" in parts.rule


@pytest.mark.parametrize("name", list(ZOO))
def test_roles_on_the_meta_device(name: str) -> None:
    """`sentinel audit` builds models on the meta device: the trace runs there too (no data, no memory)."""
    build, expected = ZOO[name]
    with torch.device("meta"):
        model = build()
    rm = assign_roles(model)
    assert rm.structure.error is None and len(rm.structure.attentions) == LAYERS
    assert {n: r.role for n, r in rm.items() if r.is_matrix} == expected


def test_wrappers_are_traced_through_and_sharded_models_are_not() -> None:
    """torch.compile and DDP wrappers: the inner module is traced (no compilation, no collective)."""
    from sentinel.model_call import unwrap

    build, expected = ZOO["plain_qkv_proj_fc"]
    model = build()
    compiled = torch.compile(model)
    rm = assign_roles(compiled)
    assert {n.removeprefix("_orig_mod."): r.role for n, r in rm.items() if r.is_matrix} == expected
    assert rm.structure.attentions[0].module == "_orig_mod.blocks.0.attn"

    class DistributedDataParallel(torch.nn.Module):  # the class name is what unwrap goes by
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(DistributedDataParallel(model))[0] is model

    class FullyShardedDataParallel(DistributedDataParallel):
        def forward(self, *args):
            return self.module(*args)

    root, why = unwrap(FullyShardedDataParallel(model))
    assert root is None and "FSDP" in why
    rm = assign_roles(FullyShardedDataParallel(model))
    assert "structure not traced" in " ".join(rm.notes) and rm.structure.error


def test_an_ambiguous_auto_preset_is_settled_by_the_structure() -> None:
    """Names from two conventions, one matrix each: the presets tie with different roles; the dataflow decides."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.attn = torch.nn.Module()
            self.attn.q_proj, self.attn.c_attn = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.vv, self.proj, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 32)

        def forward(self, ids):
            x = self.emb(ids)
            q, k, v = (m(x).view(1, -1, 2, 8).transpose(1, 2) for m in (self.attn.q_proj, self.attn.c_attn, self.vv))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(x + self.proj(y.transpose(1, 2).reshape(1, -1, 16)))

    model = Mixed()
    with pytest.raises(Exception, match="ambiguous"):
        assign_roles(model, structure=False)
    rm = assign_roles(model)
    assert rm.unassigned == [] and rm["attn.q_proj.weight"].role == "q" and rm["proj.weight"].role == "o"
    assert rm["attn.c_attn.weight"].role == "k"  # not the qkv its gpt2 name suggests
    assert any("ambiguous" in n for n in rm.notes)
