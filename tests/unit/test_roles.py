"""Parameter roles: every preset's names, fused matrices, tied weights, overrides, auto choice.

The models here reproduce each framework's parameter names and module nesting with plain
torch modules (Transformer Engine and Megatron cannot be installed on CPU).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from sentinel.examples.tiny_gpt import GPT, GPTConfig

from sentinel.config import ConfigError, load_config
from sentinel.roles import MATRIX_ROLES, PRESET_CHOICES, ROLES, RoleError, assign_roles, roles_from_config

D, FFN, HEADS, KV, HD, VOCAB = 64, 160, 4, 2, 16, 100


def matrix_roles(rm) -> dict[str, tuple[str, int | None]]:
    return {n: (r.role, r.layer) for n, r in rm.items() if r.is_matrix}


# ---------------------------------------------------------------- LLaMA (Hugging Face names)


class LlamaAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, HEADS * HD, bias=False)
        self.k_proj = nn.Linear(D, KV * HD, bias=False)
        self.v_proj = nn.Linear(D, KV * HD, bias=False)
        self.o_proj = nn.Linear(HEADS * HD, D, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, FFN, bias=False)
        self.up_proj = nn.Linear(D, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, D, bias=False)


class LlamaLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = LlamaAttention(), LlamaMLP()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(D), nn.RMSNorm(D)


class LlamaModel(nn.Module):
    def __init__(self, n_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(LlamaLayer() for _ in range(n_layers))
        self.norm = nn.RMSNorm(D)


class LlamaForCausalLM(nn.Module):
    def __init__(self, n_layers: int = 2):
        super().__init__()
        self.config = SimpleNamespace(
            hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV, num_hidden_layers=n_layers
        )
        self.model = LlamaModel(n_layers)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)


def test_llama_every_matrix_role_and_layer():
    rm = assign_roles(LlamaForCausalLM(), preset="llama")
    expected = {"model.embed_tokens.weight": ("embedding", None), "lm_head.weight": ("head", None)}
    for i in range(2):
        p = f"model.layers.{i}."
        for proj, role in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")]:
            expected[f"{p}self_attn.{proj}_proj.weight"] = (role, i)
        for proj in ("gate", "up", "down"):
            expected[f"{p}mlp.{proj}_proj.weight"] = (proj, i)
    assert matrix_roles(rm) == expected
    norms = [n for n, r in rm.items() if r.role == "norm"]
    assert norms == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    assert rm["model.norm.weight"].layer is None and rm["model.layers.1.input_layernorm.weight"].layer == 1
    assert rm.unassigned == [] and rm.unassigned_vectors == [] and rm.complete
    assert (rm.n_layers, rm.d_model, rm.d_ffn, rm.n_heads, rm.n_kv_heads) == (2, D, FFN, HEADS, KV)
    assert rm.names("o") == ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    assert rm["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * HD, D)
    assert rm.notes == []


# ---------------------------------------------------------------- GPT-2: nanoGPT and Hugging Face


def test_nanogpt_roles_c_proj_depends_on_parent():
    rm = assign_roles(GPT(GPTConfig(n_layer=2, n_embd=48, n_head=4)), preset="gpt2")
    expected = {
        "wte.weight": ("embedding", None),
        "wpe.weight": ("pos_embedding", None),
        "lm_head.weight": ("head", None),
    }
    for i in range(2):
        expected |= {
            f"h.{i}.attn.c_attn.weight": ("qkv", i),
            f"h.{i}.attn.c_proj.weight": ("o", i),
            f"h.{i}.mlp.c_fc.weight": ("up", i),
            f"h.{i}.mlp.c_proj.weight": ("down", i),
        }
    assert matrix_roles(rm) == expected
    assert {rm[f"h.{i}.{ln}.{w}"].role for i in range(2) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")} == {
        "norm"
    }
    assert rm["ln_f.bias"].role == "norm" and rm["h.1.mlp.c_fc.bias"].role == "bias"
    assert rm["h.1.mlp.c_fc.bias"].layer == 1
    parts = rm["h.0.attn.c_attn.weight"].fused_parts
    assert (parts.names, parts.sizes, parts.dim, parts.layout) == (("q", "k", "v"), (48, 48, 48), 0, "contiguous")
    assert "4 query heads" in parts.rule
    assert (rm.n_layers, rm.d_model, rm.d_ffn, rm.n_heads) == (2, 48, 192, 4)
    assert rm.unassigned == []


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: weight is (in, out), the transpose of nn.Linear's."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class HFBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = Conv1D(3 * D, D), Conv1D(D, D)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = Conv1D(4 * D, D), Conv1D(D, 4 * D)


class HFGPT2LMHeadModel(nn.Module):
    def __init__(self, n_layer: int = 3):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte, self.transformer.wpe = nn.Embedding(VOCAB, D), nn.Embedding(32, D)
        self.transformer.h = nn.ModuleList(HFBlock() for _ in range(n_layer))
        self.transformer.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied


def test_hf_gpt2_conv1d_and_tied_embedding():
    model = HFGPT2LMHeadModel()
    rm = assign_roles(model)
    assert rm.preset == "gpt2" and rm.auto
    wte = rm["transformer.wte.weight"]
    assert (wte.role, wte.aliases, wte.alias_roles) == ("embedding", ("lm_head.weight",), ("head",))
    assert "lm_head.weight" not in rm and rm.get("lm_head.weight") is wte
    assert "lm_head.weight" not in rm.unassigned
    by_name = rm.role_by_name()  # what the optimizer wrappers take: every name, aliases included
    assert by_name["lm_head.weight"] == by_name["transformer.wte.weight"] == "embedding"
    assert len(by_name) == len(rm) + 1
    assert len([n for n, _ in model.named_parameters()]) == len(rm) == len(rm.shapes)
    assert rm["transformer.h.2.mlp.c_proj.weight"].role == "down"
    assert rm["transformer.h.2.attn.c_proj.weight"].role == "o"
    # Conv1D is (in, out): the q/k/v parts lie along dim 1, and d_ffn is read from the right side
    parts = rm["transformer.h.0.attn.c_attn.weight"].fused_parts
    assert (parts.sizes, parts.dim) == ((D, D, D), 1)
    assert "d=64" in parts.rule  # no head counts anywhere: split by d
    assert (rm.n_layers, rm.d_model, rm.d_ffn) == (3, D, 4 * D)


# ---------------------------------------------------------------- Megatron (legacy and Core)


class ParallelAttention(nn.Module):
    def __init__(self, gqa: bool):
        super().__init__()
        kv = KV if gqa else HEADS
        self.num_attention_heads_per_partition = HEADS
        self.num_query_groups_per_partition = kv
        self.hidden_size_per_attention_head = HD
        self.query_key_value = nn.Linear(D, (HEADS + 2 * kv) * HD)
        self.dense = nn.Linear(HEADS * HD, D)


class ParallelMLP(nn.Module):
    def __init__(self, gated: bool):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(D, FFN * (2 if gated else 1))
        self.dense_4h_to_h = nn.Linear(FFN, D)


class ParallelTransformerLayer(nn.Module):
    def __init__(self, gated: bool, gqa: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.self_attention = ParallelAttention(gqa)
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.mlp = ParallelMLP(gated)


class MegatronGPT(nn.Module):
    """Megatron-LM legacy GPTModel names: language_model.{embedding,encoder,output_layer}."""

    def __init__(self, gated: bool = False, gqa: bool = False, n_layers: int = 2):
        super().__init__()
        lm = self.language_model = nn.Module()
        lm.embedding = nn.Module()
        lm.embedding.word_embeddings = nn.Embedding(VOCAB, D)
        lm.embedding.position_embeddings = nn.Embedding(32, D)
        lm.encoder = nn.Module()
        lm.encoder.layers = nn.ModuleList(ParallelTransformerLayer(gated, gqa) for _ in range(n_layers))
        lm.encoder.final_layernorm = nn.LayerNorm(D)
        lm.output_layer = nn.Linear(D, VOCAB, bias=False)


@pytest.mark.parametrize("gated", [False, True])
def test_megatron_legacy_roles_gated_by_shape(gated: bool):
    rm = assign_roles(MegatronGPT(gated=gated), preset="megatron")
    p = "language_model.encoder.layers."
    expected = {
        "language_model.embedding.word_embeddings.weight": ("embedding", None),
        "language_model.embedding.position_embeddings.weight": ("pos_embedding", None),
        "language_model.output_layer.weight": ("head", None),
    }
    for i in range(2):
        expected |= {
            f"{p}{i}.self_attention.query_key_value.weight": ("qkv", i),
            f"{p}{i}.self_attention.dense.weight": ("o", i),
            f"{p}{i}.mlp.dense_h_to_4h.weight": ("gate_up" if gated else "up", i),
            f"{p}{i}.mlp.dense_4h_to_h.weight": ("down", i),
        }
    assert matrix_roles(rm) == expected
    assert rm["language_model.encoder.final_layernorm.bias"].role == "norm"
    assert rm[f"{p}1.self_attention.dense.bias"].role == "bias"
    fc1 = rm[f"{p}0.mlp.dense_h_to_4h.weight"]
    if gated:
        assert (fc1.fused_parts.names, fc1.fused_parts.sizes) == (("gate", "up"), (FFN, FFN))
    else:
        assert fc1.fused_parts is None
    assert rm.d_ffn == FFN and rm.n_layers == 2 and rm.unassigned == []


def test_megatron_gqa_qkv_is_interleaved_and_split_by_head_counts():
    rm = assign_roles(MegatronGPT(gqa=True))
    assert rm.preset == "megatron"
    parts = rm["language_model.encoder.layers.0.self_attention.query_key_value.weight"].fused_parts
    assert parts.sizes == (HEADS * HD, KV * HD, KV * HD)
    assert (parts.layout, parts.groups) == ("interleaved", KV)
    assert "2 key/value heads" in parts.rule


class CoreLayerNormLinear(nn.Module):
    """Megatron-Core's TE-backed linear with its layer norm fused in (layer_norm_weight, weight)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(n_in))
        self.weight = nn.Parameter(torch.empty(n_out, n_in))


class CoreLayer(nn.Module):
    def __init__(self, fc1_rows: int):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = CoreLayerNormLinear(D, 3 * D)
        self.self_attention.linear_proj = nn.Linear(D, D, bias=False)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = CoreLayerNormLinear(D, fc1_rows)
        self.mlp.linear_fc2 = nn.Linear(FFN, D, bias=False)


class CoreGPT(nn.Module):
    def __init__(self, gated_flag: bool, fc1_rows: int):
        super().__init__()
        self.config = SimpleNamespace(gated_linear_unit=gated_flag, num_layers=3)
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(VOCAB, D)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(CoreLayer(fc1_rows) for _ in range(3))
        self.decoder.final_layernorm = nn.LayerNorm(D)
        self.output_layer = nn.Linear(D, VOCAB, bias=False)


def test_megatron_core_names_and_gated_flag():
    rm = assign_roles(CoreGPT(gated_flag=True, fc1_rows=2 * FFN))
    assert rm.preset == "megatron"
    layer = "decoder.layers.2."
    assert rm[layer + "self_attention.linear_qkv.weight"].role == "qkv"
    assert rm[layer + "self_attention.linear_qkv.layer_norm_weight"].role == "norm"
    assert rm[layer + "self_attention.linear_proj.weight"].role == "o"
    assert rm[layer + "mlp.linear_fc1.weight"].role == "gate_up"
    assert rm[layer + "mlp.linear_fc2.weight"].role == "down"
    assert rm["output_layer.weight"].role == "head" and rm.n_layers == 3 and rm.complete
    assert rm.notes == []


def test_megatron_flag_and_shape_disagree_shape_wins_with_a_note():
    rm = assign_roles(CoreGPT(gated_flag=True, fc1_rows=FFN), preset="megatron")
    assert rm["decoder.layers.0.mlp.linear_fc1.weight"].role == "up"
    assert any("gated flag True" in n and "using the shape" in n for n in rm.notes)


# ---------------------------------------------------------------- Transformer Engine


class LayerNormLinear(nn.Module):
    """te.LayerNormLinear's parameters; parameters_split (fuse_qkv_params=False) names them query_weight..."""

    def __init__(self, n_in: int, splits: dict[str, int] | None):
        super().__init__()
        self.layer_norm_weight = nn.Parameter(torch.ones(n_in))
        self.layer_norm_bias = nn.Parameter(torch.zeros(n_in))
        for name, rows in (splits or {}).items():
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.empty(rows, n_in)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(rows)))
        if splits is None:
            self.weight = nn.Parameter(torch.empty((HEADS + 2 * KV) * HD, n_in))
            self.bias = nn.Parameter(torch.zeros((HEADS + 2 * KV) * HD))


class Linear(nn.Module):
    """te.Linear: weight, bias."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))


class MultiheadAttention(nn.Module):
    def __init__(self, fuse_qkv_params: bool):
        super().__init__()
        self.num_attention_heads_per_partition = HEADS
        self.num_gqa_groups_per_partition = KV
        self.hidden_size_per_attention_head = HD
        self.qkv_weight_interleaved = fuse_qkv_params  # TE sets it False when the parameters are split
        splits = None if fuse_qkv_params else {"query": HEADS * HD, "key": KV * HD, "value": KV * HD}
        self.layernorm_qkv = LayerNormLinear(D, splits)
        self.core_attention = nn.Module()  # DotProductAttention: no parameters
        self.proj = Linear(HEADS * HD, D)


class LayerNormMLP(nn.Module):
    def __init__(self, activation: str):
        super().__init__()
        self.activation = activation
        gated = activation in ("geglu", "qgeglu", "reglu", "sreglu", "swiglu")
        self.layer_norm_weight = nn.Parameter(torch.ones(D))
        self.layer_norm_bias = nn.Parameter(torch.zeros(D))
        self.fc1_weight = nn.Parameter(torch.empty(FFN * (2 if gated else 1), D))
        self.fc1_bias = nn.Parameter(torch.zeros(FFN * (2 if gated else 1)))
        self.fc2_weight = nn.Parameter(torch.empty(D, FFN))
        self.fc2_bias = nn.Parameter(torch.zeros(D))


class TransformerLayer(nn.Module):
    def __init__(self, activation: str, fuse_qkv_params: bool):
        super().__init__()
        self.self_attention = MultiheadAttention(fuse_qkv_params)
        self.layernorm_mlp = LayerNormMLP(activation)


class TEGPT(nn.Module):
    def __init__(self, activation: str = "swiglu", fuse_qkv_params: bool = False, n_layers: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(TransformerLayer(activation, fuse_qkv_params) for _ in range(n_layers))
        self.final_layernorm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)


def test_te_split_qkv_and_gated_mlp():
    rm = assign_roles(TEGPT(activation="swiglu"), preset="te")
    expected = {"word_embeddings.weight": ("embedding", None), "lm_head.weight": ("head", None)}
    for i in range(2):
        a, mlp = f"layers.{i}.self_attention.", f"layers.{i}.layernorm_mlp."
        expected |= {
            a + "layernorm_qkv.query_weight": ("q", i),
            a + "layernorm_qkv.key_weight": ("k", i),
            a + "layernorm_qkv.value_weight": ("v", i),
            a + "proj.weight": ("o", i),
            mlp + "fc1_weight": ("gate_up", i),
            mlp + "fc2_weight": ("down", i),
        }
    assert matrix_roles(rm) == expected
    a = "layers.1.self_attention.layernorm_qkv."
    assert rm[a + "layer_norm_weight"].role == rm[a + "layer_norm_bias"].role == "norm"
    assert rm[a + "query_bias"].role == rm["layers.1.layernorm_mlp.fc1_bias"].role == "bias"
    assert rm["layers.0.layernorm_mlp.layer_norm_weight"].role == "norm"
    assert rm["layers.0.layernorm_mlp.fc1_weight"].fused_parts.sizes == (FFN, FFN)
    assert (rm.n_layers, rm.d_model, rm.d_ffn, rm.n_heads, rm.n_kv_heads) == (2, D, FFN, HEADS, KV)
    assert rm.unassigned == [] and rm.unassigned_vectors == [] and rm.notes == []


def test_te_fused_qkv_gqa_and_plain_gelu_mlp():
    rm = assign_roles(TEGPT(activation="gelu", fuse_qkv_params=True), preset="te")
    qkv = rm["layers.0.self_attention.layernorm_qkv.weight"]
    assert qkv.role == "qkv" and qkv.layer == 0
    assert qkv.fused_parts.sizes == (HEADS * HD, KV * HD, KV * HD)
    assert (qkv.fused_parts.layout, qkv.fused_parts.groups) == ("interleaved", KV)
    assert "qkv_weight_interleaved=True" in qkv.fused_parts.rule
    assert rm["layers.1.layernorm_mlp.fc1_weight"].role == "up"  # 'gelu' is not gated
    assert rm.d_ffn == FFN and rm.complete


def test_te_activation_decides_before_shape_is_needed():
    model = TEGPT(activation="swiglu")
    for layer in model.layers:
        del layer.layernorm_mlp.activation  # no attribute: the shape (2 x fc2's input) decides
    rm = assign_roles(model, preset="te")
    assert rm["layers.0.layernorm_mlp.fc1_weight"].role == "gate_up" and rm.notes == []


# ---------------------------------------------------------------- auto, unassigned, overrides


@pytest.mark.parametrize(
    "make, preset",
    [
        (LlamaForCausalLM, "llama"),
        (lambda: GPT(GPTConfig(n_layer=2)), "gpt2"),
        (HFGPT2LMHeadModel, "gpt2"),
        (lambda: MegatronGPT(gated=True), "megatron"),
        (TEGPT, "te"),
    ],
)
def test_auto_picks_the_preset_that_assigns_most(make, preset: str):
    rm = assign_roles(make())
    assert rm.auto and rm.preset == preset
    best = rm.preset_scores[preset]
    assert all(score < best for name, score in rm.preset_scores.items() if name != preset)
    assert best == len(rm.matrices) and rm.complete


def test_auto_tie_with_different_roles_is_an_error_naming_the_candidates():
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.c_attn = nn.Linear(8, 24)  # gpt2: qkv
    model.self_attn = nn.Module()
    model.self_attn.q_proj = nn.Linear(8, 8)  # llama: q
    with pytest.raises(RoleError, match=r"presets llama, gpt2 each assign 1 matrices") as info:
        assign_roles(model)
    assert "--preset" in str(info.value)
    rm = assign_roles(model, preset="gpt2")  # choosing one settles it; the other matrix is reported
    assert rm["attn.c_attn.weight"].role == "qkv" and rm.unassigned == ["self_attn.q_proj.weight"]


def test_auto_with_only_common_names_reports_generic():
    model = nn.Module()
    model.tok_embeddings = nn.Embedding(VOCAB, D)
    model.mixer = nn.Linear(D, D)
    rm = assign_roles(model)
    assert rm.preset == "generic"
    assert rm["tok_embeddings.weight"].role == "embedding"
    assert rm.unassigned == ["mixer.weight"] and rm.unassigned_vectors == []
    assert rm["mixer.bias"].role == "bias"


def test_unknown_matrix_is_unassigned_never_guessed():
    model = GPT(GPTConfig(n_layer=2))
    model.h[1].attn.adapter = nn.Linear(128, 8, bias=False)
    model.temperature = nn.Parameter(torch.ones(()))
    rm = assign_roles(model)
    assert rm.preset == "gpt2"
    assert rm.unassigned == ["h.1.attn.adapter.weight"] and not rm.complete
    assert "h.1.attn.adapter.weight" not in rm
    assert rm.unassigned_vectors == ["temperature"]
    assert "h.1.attn.adapter.weight" in rm.matrices


def test_overrides_are_applied_last_with_full_match():
    model = GPT(GPTConfig(n_layer=2))
    model.h[1].attn.adapter = nn.Linear(128, 8, bias=False)
    rm = assign_roles(
        model,
        overrides={
            r"h\.\d+\.attn\.adapter\.weight": "o",
            r"h\.0\.mlp\.c_fc\.weight": "gate",  # wins over the preset
            r"c_fc": "up",  # full match: matches nothing
        },
    )
    adapter = rm["h.1.attn.adapter.weight"]
    assert (adapter.role, adapter.layer, adapter.source) == ("o", 1, r"override h\.\d+\.attn\.adapter\.weight")
    assert rm["h.0.mlp.c_fc.weight"].role == "gate" and rm["h.1.mlp.c_fc.weight"].role == "up"
    assert rm["h.1.mlp.c_fc.weight"].source.startswith("preset gpt2")
    assert rm.complete
    assert rm.notes == ["override 'c_fc' matches no parameter"]


def test_override_to_a_fused_role_gets_its_parts():
    model = nn.Module()
    model.attn_in = nn.Linear(D, 3 * D)
    rm = assign_roles(model, preset="generic", overrides={"attn_in.weight": "qkv"})
    assert rm["attn_in.weight"].fused_parts.sizes == (D, D, D)
    assert "equal thirds" in rm["attn_in.weight"].fused_parts.rule


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lm_head.weight": "ffn"}, "unknown role 'ffn'; allowed roles: embedding, pos_embedding, q, k, v"),
        ({"(": "o"}, "'(' is not a valid regular expression"),
        ({1: "o"}, "is not a string"),
    ],
)
def test_bad_overrides_fail_clearly(overrides, message: str):
    with pytest.raises(RoleError, match=message.replace("(", r"\(")):
        assign_roles(GPT(GPTConfig(n_layer=1)), overrides=overrides)


def test_unknown_preset_fails():
    with pytest.raises(RoleError, match="unknown preset 'bert'; allowed: auto, llama, gpt2, megatron, te, generic"):
        assign_roles(GPT(GPTConfig(n_layer=1)), preset="bert")


# ---------------------------------------------------------------- config


def test_config_roles_section_defaults_and_use():
    cfg = load_config({"roles": {"preset": "gpt2", "overrides": {r"h\.0\.mlp\.c_fc\.weight": "gate"}}})
    assert cfg.roles.preset == "gpt2"
    rm = roles_from_config(GPT(GPTConfig(n_layer=1)), cfg)
    assert rm["h.0.mlp.c_fc.weight"].role == "gate" and not rm.auto
    assert load_config().roles.preset == "auto" and load_config().roles.overrides == {}


def test_config_unknown_role_in_overrides_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_config({"roles": {"overrides": {"lm_head.weight": "lm_head"}}})
    assert str(info.value).startswith("roles.overrides['lm_head.weight']: unknown role 'lm_head'; allowed roles:")


def test_config_bad_preset_and_bad_overrides_type():
    with pytest.raises(ConfigError, match=r"roles\.preset: 'bert' is not allowed; allowed: one of 'auto'"):
        load_config({"roles": {"preset": "bert"}})
    with pytest.raises(ConfigError, match=r"roles\.overrides: \['o'\] is not a mapping"):
        load_config({"roles": {"overrides": ["o"]}})


def test_config_choices_match_the_module():
    from sentinel.config import RolesConfig
    from sentinel.roles import PRESETS

    (preset,) = [f for f in dataclasses.fields(RolesConfig) if f.name == "preset"]
    assert preset.metadata["choices"] == PRESET_CHOICES
    assert set(PRESETS) == set(PRESET_CHOICES) - {"auto"}
    assert set(MATRIX_ROLES) < set(ROLES)
