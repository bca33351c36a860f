"""Roles and attention probes on more Hugging Face architectures than the exact matrix lists.

tests/unit/test_roles_matrix.py says, for a dozen architectures, what every matrix *is*; this
one asks less of many more, built from tiny configs in code (no download) as a new user's model
would be: no weight matrix without a role, the attention of every block found by the trace, and
an ``attn_logit_max`` row for every block after one real forward/backward.  Parallel residuals
(GPT-J, CodeGen, Cohere), multi-query fused QKV (GPTBigCode, Falcon's new decoder), ALiBi (Bloom,
MPT), soft-capped and sliding-window attention (Gemma 2/3), post-norms (OLMo 2), scaled
multipliers (Granite), partial RoPE (Persimmon, StableLM), and mixtures of experts (Qwen3-MoE,
OLMoE, Phi-MoE, Llama 4, GPT-OSS with its stacked per-expert biases).  An architecture the
installed ``transformers`` does not have is skipped, not failed.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sentinel.model_call import example_ids, forward_loss  # noqa: E402
from sentinel.probes import Probes  # noqa: E402
from sentinel.roles import assign_roles  # noqa: E402

D, LAYERS = 32, 2
BASE = dict(vocab_size=64, hidden_size=D, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8)  # fmt: skip
GPT_STYLE = dict(vocab_size=64, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64)
MOE = dict(num_experts=4, num_experts_per_tok=2)
#: name -> (config class, model class, config, attention implementation)
ARCHS = {
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(GPT_STYLE, rotary_dim=4), "sdpa"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(GPT_STYLE, multi_query=True), "sdpa"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(GPT_STYLE, rotary_dim=4, n_ctx=64), "sdpa"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=64, hidden_size=D, n_layer=LAYERS, n_head=4), "eager"),
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=64, d_model=D, n_layers=LAYERS, n_heads=4, max_seq_len=64),
            "eager"),
    "falcon_new_decoder": ("FalconConfig", "FalconForCausalLM",
                           dict(vocab_size=64, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                                new_decoder_architecture=True, num_kv_heads=2), "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", BASE, "eager"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", BASE, "sdpa"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", BASE, "sdpa"),
    "cohere": ("CohereConfig", "CohereForCausalLM", BASE, "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", BASE, "sdpa"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", BASE, "sdpa"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", BASE, "sdpa"),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(BASE, num_key_value_heads=4), "sdpa"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", BASE, "sdpa"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(BASE, pad_token_id=0), "sdpa"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(BASE, **MOE, moe_intermediate_size=24), "sdpa"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(BASE, **MOE), "sdpa"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(BASE, num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(BASE, num_local_experts=4, intermediate_size_mlp=48),
                    "sdpa"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(BASE, num_local_experts=4, num_experts_per_tok=2), "eager"),
}  # fmt: skip


def _build(name: str) -> torch.nn.Module:
    config, model, kw, attn = ARCHS[name]
    if not hasattr(transformers, config) or not hasattr(transformers, model):
        pytest.skip(f"transformers {transformers.__version__} has no {model}")
    cfg = getattr(transformers, config)(**kw)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return getattr(transformers, model)(cfg)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_matrix_has_a_role_and_every_block_an_attention_probe(name: str) -> None:
    model = _build(name)
    rm = assign_roles(model)
    assert rm.structure is not None and rm.structure.error is None
    assert rm.unassigned == [], f"matrices without a role: {rm.unassigned}"
    assert len(rm.structure.attentions) == LAYERS
    matrices = {r.role for r in rm.values() if r.is_matrix}
    assert {"embedding", "o", "down"} <= matrices and matrices & {"q", "qkv"}

    probes = Probes(model, rm, every=1, sample=8)
    assert len(probes.plan.attentions) == LAYERS
    probes.begin_step(0)
    forward_loss(model, example_ids(model, seq=8, batch=2)).backward()
    rows: dict[str, float] = {}
    for layout, packed in probes.collect():
        if "attn_logit_max" in layout.stats:
            matrix = packed.reshape(len(layout.tensors), len(layout.stats))
            rows = dict(zip(layout.tensors, matrix[:, layout.stats.index("attn_logit_max")].tolist()))
    assert len(rows) == LAYERS and all(torch.isfinite(torch.tensor(v)) for v in rows.values())


def test_stacked_expert_biases_are_biases_not_matrices_without_a_role() -> None:
    rm = assign_roles(_build("gpt_oss"))
    biases = {n: r.role for n, r in rm.items() if n.endswith("_bias")}
    assert biases and set(biases.values()) == {"bias"}
