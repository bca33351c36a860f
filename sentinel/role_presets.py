"""The name presets of :mod:`sentinel.roles`: the roles, and the parameter-name patterns
each framework's convention implies (docs/roles.md lists them).

Why a module of its own: presets are data, the fast path before the structural trace
(sentinel/role_trace.py); keeping them apart from the algorithm keeps both readable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["BLOCK_ROLES", "MATRIX_ROLES", "PRESETS", "PRESET_CHOICES", "PRESET_NAMES", "ROLES", "VECTOR_ROLES"]

ROLES = (
    "embedding",
    "pos_embedding",
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "up",
    "gate",
    "gate_up",
    "down",
    "router",
    "head",
    "norm",
    "bias",
)
VECTOR_ROLES = ("norm", "bias")
MATRIX_ROLES = tuple(r for r in ROLES if r not in VECTOR_ROLES)
#: roles of the matrices inside transformer blocks: these carry a layer index and count towards N
BLOCK_ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down")
PRESET_NAMES = ("llama", "gpt2", "megatron", "te", "generic")
PRESET_CHOICES = ("auto", *PRESET_NAMES)

_UP_OR_GATE_UP = "up|gate_up"  # resolved per matrix: gated MLPs fuse gate and up into one matrix


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    role: str  # a role, or _UP_OR_GATE_UP
    matrix: bool  # applies to matrices (dim >= 2) if True, else to vectors (dim < 2)
    layout: str = "contiguous"  # qkv layout
    partner: tuple[str, str] | None = None  # (regex, replacement): the name of the down matrix


def _m(pattern: str, role: str, **kw: Any) -> _Rule:
    return _Rule(re.compile(pattern), role, True, **kw)


def _v(pattern: str, role: str) -> _Rule:
    return _Rule(re.compile(pattern), role, False)


_P = r"(?:^|\.)"  # start of a path component

#: names every preset knows, tried after the preset's own rules
_COMMON = (
    _m(
        _P + r"(?:embed_tokens|tok_embeddings|wte|word_embeddings|token_embedding|token_embeddings)\.weight$",
        "embedding",
    ),
    _m(_P + r"(?:wpe|position_embeddings|pos_embedding|pos_embeddings|pos_emb)\.weight$", "pos_embedding"),
    _m(_P + r"(?:lm_head|output_layer)\.weight$", "head"),
    _v(_P + r"(?:[^.]*norm[^.]*|ln_[^.]*|ln\d*)\.(?:weight|bias)$", "norm"),
    _v(r"(?:^|\.)layer_norm_(?:weight|bias)$", "norm"),
    _v(r"(?:^|[._])bias$", "bias"),
)

_PRESET_RULES: dict[str, tuple[_Rule, ...]] = {
    "llama": (
        _m(_P + r"embed_tokens\.weight$", "embedding"),
        _m(_P + r"q_proj\.weight$", "q"),
        _m(_P + r"k_proj\.weight$", "k"),
        _m(_P + r"v_proj\.weight$", "v"),
        _m(_P + r"qkv_proj\.weight$", "qkv"),  # Phi-3 style fused QKV
        _m(_P + r"o_proj\.weight$", "o"),
        _m(_P + r"gate_proj\.weight$", "gate"),
        _m(_P + r"up_proj\.weight$", "up"),
        _m(_P + r"gate_up_proj\.weight$", "gate_up"),  # Phi-3 style fused gate/up
        _m(_P + r"down_proj\.weight$", "down"),
        _m(_P + r"lm_head\.weight$", "head"),
        _v(_P + r"[^.]*norm[^.]*\.(?:weight|bias)$", "norm"),
    ),
    "gpt2": (
        _m(_P + r"wte\.weight$", "embedding"),
        _m(_P + r"wpe\.weight$", "pos_embedding"),
        _m(_P + r"attn\.c_attn\.weight$", "qkv"),
        _m(_P + r"attn\.c_proj\.weight$", "o"),
        _m(_P + r"mlp\.c_fc\.weight$", "up"),
        _m(_P + r"mlp\.c_proj\.weight$", "down"),
        _m(_P + r"lm_head\.weight$", "head"),
        _v(_P + r"ln_[^.]*\.(?:weight|bias)$", "norm"),
    ),
    "megatron": (
        _m(_P + r"word_embeddings\.weight$", "embedding"),
        _m(_P + r"position_embeddings\.weight$", "pos_embedding"),
        _m(_P + r"self_attention\.query_key_value\.weight$", "qkv", layout="interleaved"),
        _m(_P + r"self_attention\.dense\.weight$", "o"),
        _m(
            _P + r"mlp\.dense_h_to_4h\.weight$",
            _UP_OR_GATE_UP,
            partner=(r"dense_h_to_4h\.weight$", "dense_4h_to_h.weight"),
        ),
        _m(_P + r"mlp\.dense_4h_to_h\.weight$", "down"),
        # Megatron-Core names
        _m(_P + r"self_attention\.linear_qkv\.weight$", "qkv", layout="interleaved"),
        _m(_P + r"self_attention\.linear_proj\.weight$", "o"),
        _m(
            _P + r"mlp\.linear_fc1\.weight$",
            _UP_OR_GATE_UP,
            partner=(r"linear_fc1\.weight$", "linear_fc2.weight"),
        ),
        _m(_P + r"mlp\.linear_fc2\.weight$", "down"),
        _m(_P + r"output_layer\.weight$", "head"),
        _v(_P + r"[^.]*layernorm[^.]*\.(?:weight|bias)$", "norm"),
    ),
    "te": (
        # te.TransformerLayer -> self_attention (MultiheadAttention) -> layernorm_qkv (LayerNormLinear)
        # or qkv (Linear); fuse_qkv_params=False (TE's default) splits it into query/key/value_weight
        _m(_P + r"(?:layernorm_qkv|qkv)\.weight$", "qkv", layout="te"),
        _m(_P + r"(?:layernorm_qkv|qkv|layernorm_query|query_layer)\.query_weight$", "q"),
        _m(_P + r"(?:layernorm_qkv|qkv|key_value)\.key_weight$", "k"),
        _m(_P + r"(?:layernorm_qkv|qkv|key_value)\.value_weight$", "v"),
        _m(_P + r"(?:layernorm_query|query_layer)\.weight$", "q"),  # cross attention (inter_attention)
        _m(_P + r"(?:self_attention|inter_attention)\.proj\.weight$", "o"),
        # te.LayerNormMLP (layernorm_mlp in a TransformerLayer)
        _m(r"(?:^|\.)fc1_weight$", _UP_OR_GATE_UP, partner=(r"fc1_weight$", "fc2_weight")),
        _m(r"(?:^|\.)fc2_weight$", "down"),
        _v(r"(?:^|\.)layer_norm_(?:weight|bias)$", "norm"),
        _v(r"(?:^|\.)(?:fc1|fc2|query|key|value)_bias$", "bias"),
    ),
    "generic": (),
}

#: preset name -> the rules it tries, in order (its own, then the common names)
PRESETS: dict[str, tuple[_Rule, ...]] = {name: rules + _COMMON for name, rules in _PRESET_RULES.items()}

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")

# attribute names (on a module, or on its .config / .cfg / .args) that reveal the architecture
_HEADS = ("num_attention_heads_per_partition", "num_attention_heads", "num_heads", "n_head", "n_heads")
_KV_HEADS = (
    "num_gqa_groups_per_partition",
    "num_query_groups_per_partition",
    "num_gqa_groups",
    "num_query_groups",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_head",
    "n_kv_heads",
)
_HEAD_DIM = ("hidden_size_per_attention_head", "head_dim", "kv_channels")
_N_LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
_GATED_FLAGS = ("gated_linear_unit", "swiglu", "glu", "gated")
_ACTIVATION = ("activation", "hidden_act", "activation_function")
