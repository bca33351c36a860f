"""The zoo's models: the tiny GPT of examples/tiny_gpt.py, and others written by nobody here.

* ``gpt``: examples/tiny_gpt.GPT (GPT-2 names: ``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``), with
  its QK-norm and soft-cap options;
* ``llama``: Hugging Face ``LlamaForCausalLM`` built from a config in code (RMSNorm, SwiGLU,
  RoPE, separate ``q_proj``/``k_proj``/``v_proj``), and ``qwen3``, the same with QK-norm
  (``q_norm``/``k_norm``), its stable twin;
* ``plain``: a byte-level GPT in another naming style (``qkv``, ``proj``, ``fc1``, ``fc2``,
  ``ln1``, ``ln2``, ``tok``/``pos``/``out``), which no name preset knows;
* the held-out architectures of ``HF`` (GPT-NeoX, Mistral with one KV head, Phi, Gemma and GPT-2
  with tied embeddings, OPT, Qwen3-MoE, Gemma 2 with soft-capped eager attention, GPT-J), trained
  only in the held-out runs: no default was fitted on them, so their false alarms say how the
  defaults carry over to models the zoo did not tune for.

``forward(model, x, y)`` returns (logits, loss) for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.tiny_gpt import GPT, GPTConfig


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "gpt"  # gpt | plain | a Hugging Face kind of HF
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    qk_norm: bool = False
    softcap: float | None = None


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        if self.qk_norm:
            q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Plain(nn.Module):
    """A nanoGPT-like model whose names match no preset."""

    def __init__(self, spec: ModelSpec, vocab: int = 256):
        super().__init__()
        d = spec.n_embd
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(spec.block_size, d)
        self.blocks = nn.ModuleList(PlainBlock(d, spec.n_head, spec.qk_norm) for _ in range(spec.n_layer))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * spec.n_layer) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x))


#: kind -> (config class, model class, extra config) of the Hugging Face models built in code (no download)
HF = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": None}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1}),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": None, "tie_word_embeddings": True}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": None, "n_layer": None, "n_head": None, "n_positions": None,
                                                "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": None, "word_embed_proj_dim": None, "pad_token_id": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": None, "num_experts": 4, "num_experts_per_tok": 2,
                                                            "moe_intermediate_size": 64}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": None, "attn_implementation": "eager"}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": None, "n_layer": None, "n_head": None, "n_positions": None,
                                               "rotary_dim": 8, "bos_token_id": 0, "eos_token_id": 0}),
}  # fmt: skip


def _hf(spec: ModelSpec) -> nn.Module:
    import transformers

    config, model, extra = HF[spec.kind]
    ffn = int(8 * spec.n_embd / 3 / 8 + 1) * 8
    derived = {"head_dim": spec.n_embd // spec.n_head, "n_embd": spec.n_embd, "n_layer": spec.n_layer,
               "n_head": spec.n_head, "n_positions": spec.block_size, "ffn_dim": 4 * spec.n_embd,
               "word_embed_proj_dim": spec.n_embd}  # fmt: skip
    kw = dict(
        vocab_size=256, hidden_size=spec.n_embd, intermediate_size=ffn, num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head, max_position_embeddings=spec.block_size,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    kw.update({k: derived[k] if v is None else v for k, v in extra.items()})
    return getattr(transformers, model)(getattr(transformers, config)(**kw))


def build(spec: ModelSpec) -> nn.Module:
    if spec.kind == "gpt":
        cfg = GPTConfig(block_size=spec.block_size, n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd,
                        qk_norm=spec.qk_norm, softcap=spec.softcap)  # fmt: skip
        return GPT(cfg)
    if spec.kind == "plain":
        return Plain(spec)
    return _hf(spec)


def head_params(model: nn.Module) -> list[str]:
    """Names of the output head's parameters (for a head without weight decay)."""
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.split(".")[-2] in ("lm_head", "out")]


def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(model, GPT):
        return model(x, y)
    logits = model(x) if isinstance(model, Plain) else model(input_ids=x).logits
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
