"""Tiny transformer architectures built in code (no download) for the role and probe matrix.

Each entry builds a model and says what every weight matrix is, by the suffix of its name; the
plain GPTs use naming styles no preset knows.  :func:`scramble` renames every module and
parameter of a built model (attribute access keeps working) so that names carry no meaning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, D, HEADS, LAYERS, FFN = 64, 32, 4, 2, 48


# ---------------------------------------------------------------- plain GPTs in several styles


class _Attn(nn.Module):
    def __init__(self, names: tuple[str, str], fused: bool = True, eager: bool = False, kv_heads: int = HEADS):
        super().__init__()
        self.names, self.fused, self.eager, self.kv = names, fused, eager, kv_heads
        hd = D // HEADS
        if fused:
            setattr(self, names[0], nn.Linear(D, D + 2 * kv_heads * hd))
        else:
            self.a, self.b, self.c = nn.Linear(D, D), nn.Linear(D, kv_heads * hd), nn.Linear(D, kv_heads * hd)
        setattr(self, names[1], nn.Linear(D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        hd = D // HEADS
        if self.fused:
            q, k, v = getattr(self, self.names[0])(x).split([D, self.kv * hd, self.kv * hd], dim=-1)
        else:
            q, k, v = self.a(x), self.b(x), self.c(x)
        q = q.view(B, L, HEADS, hd).transpose(1, 2)
        k = k.view(B, L, self.kv, hd).transpose(1, 2).repeat_interleave(HEADS // self.kv, dim=1)
        v = v.view(B, L, self.kv, hd).transpose(1, 2).repeat_interleave(HEADS // self.kv, dim=1)
        if self.eager:
            w = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            w = w.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            y = torch.softmax(w, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return getattr(self, self.names[1])(y.transpose(1, 2).reshape(B, L, D))


class _MLP(nn.Module):
    def __init__(self, names: tuple[str, ...], gated: bool):
        super().__init__()
        self.names, self.gated = names, gated
        for n, (i, o) in zip(names, [(D, FFN), (FFN, D)] if not gated else [(D, FFN), (D, FFN), (FFN, D)]):
            setattr(self, n, nn.Linear(i, o, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = [getattr(self, n) for n in self.names]
        if self.gated:
            return f[2](F.silu(f[0](x)) * f[1](x))
        return f[1](F.gelu(f[0](x)))


class _Block(nn.Module):
    def __init__(self, style: dict):
        super().__init__()
        n1, n2 = style["norms"]
        setattr(self, n1, nn.LayerNorm(D) if not style.get("rms") else nn.RMSNorm(D))
        setattr(self, n2, nn.LayerNorm(D) if not style.get("rms") else nn.RMSNorm(D))
        self.norm_names = (n1, n2)
        self.attn_name, self.mlp_name = style["blocks"]
        setattr(self, self.attn_name, _Attn(style["attn"], style.get("fused", True), style.get("eager", False),
                                            style.get("kv", HEADS)))  # fmt: skip
        setattr(self, self.mlp_name, _MLP(style["mlp"], style.get("gated", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n1, n2 = (getattr(self, n) for n in self.norm_names)
        x = x + getattr(self, self.attn_name)(n1(x))
        return x + getattr(self, self.mlp_name)(n2(x))


class PlainGPT(nn.Module):
    """A byte-level GPT whose every name comes from ``style``; ``forward(idx, targets=None)``."""

    def __init__(self, style: dict):
        super().__init__()
        e, p, h, f, head = style["top"]
        setattr(self, e, nn.Embedding(VOCAB, D))
        if p:
            setattr(self, p, nn.Embedding(16, D))
        setattr(self, h, nn.ModuleList(_Block(style) for _ in range(LAYERS)))
        setattr(self, f, nn.LayerNorm(D))
        setattr(self, head, nn.Linear(D, VOCAB, bias=False))
        self.top, self.last_only = style["top"], style.get("last_only", False)
        if style.get("tied"):
            getattr(self, head).weight = getattr(self, e).weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        e, p, h, f, head = self.top
        x = getattr(self, e)(idx)
        if p:
            x = x + getattr(self, p)(torch.arange(idx.shape[1], device=idx.device))
        for block in getattr(self, h):
            x = block(x)
        x = getattr(self, f)(x)
        if targets is None and self.last_only:  # nanoGPT: logits of the last position only
            return getattr(self, head)(x[:, [-1], :]), None
        logits = getattr(self, head)(x)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


STYLES = {
    # qkv/proj/fc1/fc2/ln1/ln2: the ordinary nanoGPT-like style no preset knew
    "plain_qkv_proj_fc": dict(top=("tok", "pos", "blocks", "ln_f", "head"), norms=("ln1", "ln2"),
                              blocks=("attn", "mlp"), attn=("qkv", "proj"), mlp=("fc1", "fc2")),
    # obfuscated a/b/c everywhere, SwiGLU MLP, eager softmax attention, separate q/k/v with GQA
    "obfuscated_abc": dict(top=("a", None, "b", "c", "d"), norms=("a", "b"), blocks=("c", "d"),
                           attn=("x", "y"), mlp=("a", "b", "c"), gated=True, eager=True, fused=False, kv=2, rms=True),
    # nanoGPT's names: fused c_attn, tied head, last-position logits without targets
    "nanogpt_c_attn": dict(top=("wte", "wpe", "h", "ln_f", "lm_head"), norms=("ln_1", "ln_2"),
                           blocks=("attn", "mlp"), attn=("c_attn", "c_proj"), mlp=("c_fc", "c_proj"),
                           tied=True, last_only=True),
}  # fmt: skip


def _plain_expected(style: dict) -> dict[str, str]:
    e, p, h, f, head = style["top"]
    out = {f"{e}.weight": "embedding", f"{head}.weight": "head"}
    if p:
        out[f"{p}.weight"] = "pos_embedding"
    for i in range(LAYERS):
        b = f"{h}.{i}."
        an, mn = style["blocks"]
        if style.get("fused", True):
            out[f"{b}{an}.{style['attn'][0]}.weight"] = "qkv"
        else:
            out |= {f"{b}{an}.a.weight": "q", f"{b}{an}.b.weight": "k", f"{b}{an}.c.weight": "v"}
        out[f"{b}{an}.{style['attn'][1]}.weight"] = "o"
        roles = ("gate", "up", "down") if style.get("gated") else ("up", "down")
        out |= {f"{b}{mn}.{n}.weight": r for n, r in zip(style["mlp"], roles)}
    if style.get("tied"):
        out.pop(f"{head}.weight")
    return out


# ---------------------------------------------------------------- Hugging Face models


def _hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        base = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=FFN, max_position_embeddings=64)  # fmt: skip
        base.update(kw)
        torch.manual_seed(0)
        return getattr(transformers, model)(getattr(transformers, config)(**base))

    return build


def _llama_like(prefix: str = "model.layers.{i}.", head: str | None = "lm_head.weight", mlp: str = "mlp.") -> dict:
    out = {"model.embed_tokens.weight": "embedding"}
    if head:
        out[head] = "head"
    for i in range(LAYERS):
        b = prefix.format(i=i)
        out |= {f"{b}self_attn.{n}_proj.weight": n for n in ("q", "k", "v", "o")}
        out |= {f"{b}{mlp}{n}_proj.weight": n for n in ("gate", "up", "down")}
    return out


def _gpt2() -> dict:
    out = {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "pos_embedding"}
    for i in range(LAYERS):
        b = f"transformer.h.{i}."
        out |= {b + "attn.c_attn.weight": "qkv", b + "attn.c_proj.weight": "o"}
        out |= {b + "mlp.c_fc.weight": "up", b + "mlp.c_proj.weight": "down"}
    return out


def _neox() -> dict:
    out = {"gpt_neox.embed_in.weight": "embedding", "lm_head.weight": "head"}
    for i in range(LAYERS):
        b = f"gpt_neox.layers.{i}."
        out |= {b + "attention.query_key_value.weight": "qkv", b + "attention.dense.weight": "o"}
        out |= {b + "mlp.dense_h_to_4h.weight": "up", b + "mlp.dense_4h_to_h.weight": "down"}
    return out


def _phi() -> dict:
    out = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head"}
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        out |= {f"{b}self_attn.{n}_proj.weight": n for n in ("q", "k", "v")}
        out |= {b + "self_attn.dense.weight": "o", b + "mlp.fc1.weight": "up", b + "mlp.fc2.weight": "down"}
    return out


def _phi3() -> dict:
    out = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head"}
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        out |= {b + "self_attn.qkv_proj.weight": "qkv", b + "self_attn.o_proj.weight": "o"}
        out |= {b + "mlp.gate_up_proj.weight": "gate_up", b + "mlp.down_proj.weight": "down"}
    return out


def _opt() -> dict:
    out = {"model.decoder.embed_tokens.weight": "embedding", "model.decoder.embed_positions.weight": "pos_embedding"}
    for i in range(LAYERS):
        b = f"model.decoder.layers.{i}."
        out |= {f"{b}self_attn.{n}_proj.weight": n for n in ("q", "k", "v")}
        out |= {b + "self_attn.out_proj.weight": "o", b + "fc1.weight": "up", b + "fc2.weight": "down"}
    return out


def _falcon() -> dict:
    out = {"transformer.word_embeddings.weight": "embedding"}
    for i in range(LAYERS):
        b = f"transformer.h.{i}."
        out |= {b + "self_attention.query_key_value.weight": "qkv", b + "self_attention.dense.weight": "o"}
        out |= {b + "mlp.dense_h_to_4h.weight": "up", b + "mlp.dense_4h_to_h.weight": "down"}
    return out


def _moe(experts: str, shared: bool) -> dict:
    out = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head"}
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        out |= {f"{b}self_attn.{n}_proj.weight": n for n in ("q", "k", "v", "o")}
        out |= {b + "mlp.gate.weight": "router", b + f"mlp.{experts}.gate_up_proj": "gate_up",
                b + f"mlp.{experts}.down_proj": "down"}  # fmt: skip
        if shared:
            out |= {f"{b}mlp.shared_expert.{n}_proj.weight": n for n in ("gate", "up", "down")}
            out[b + "mlp.shared_expert_gate.weight"] = "router"
    return out


# ---------------------------------------------------------------- no nn.Linear, no nn.Embedding


class _RawBlock(nn.Module):
    """Weights as bare Parameters used by ``einsum`` and ``@``, eager softmax attention with its mask
    built by hand, RMSNorm through the functional call: dataflow only, no module type to go by."""

    def __init__(self) -> None:
        super().__init__()
        self.g_a, self.g_b = nn.Parameter(torch.ones(D)), nn.Parameter(torch.ones(D))
        for n, shape in (("w_anfrage", (D, D)), ("w_schluessel", (D, D)), ("w_wert", (D, D)), ("w_aus", (D, D)),
                         ("w_tor", (D, FFN)), ("w_hoch", (D, FFN)), ("w_runter", (FFN, D))):  # fmt: skip
            setattr(self, n, nn.Parameter(torch.randn(shape) * 0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        a = F.rms_norm(x, (C,), self.g_a)
        q, k, v = (torch.einsum("btc,cd->btd", a, w).view(B, T, HEADS, -1).transpose(1, 2)
                   for w in (self.w_anfrage, self.w_schluessel, self.w_wert))  # fmt: skip
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        x = x + (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C) @ self.w_aus
        b = F.rms_norm(x, (C,), self.g_b)
        return x + (F.silu(b @ self.w_tor) * (b @ self.w_hoch)) @ self.w_runter


class RawGPT(nn.Module):
    """Embedding by indexing a Parameter, the head a bare matrix: ``forward(idx)`` returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.einbettung = nn.Parameter(torch.randn(VOCAB, D) * 0.02)
        self.stapel = nn.ModuleList(_RawBlock() for _ in range(LAYERS))
        self.kopf = nn.Parameter(torch.randn(D, VOCAB) * 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.einbettung[idx]
        for blk in self.stapel:
            x = blk(x)
        return x @ self.kopf


def _raw() -> dict[str, str]:
    parts = {"w_anfrage": "q", "w_schluessel": "k", "w_wert": "v", "w_aus": "o", "w_tor": "gate", "w_hoch": "up",
             "w_runter": "down"}  # fmt: skip
    out = {f"stapel.{i}.{n}": r for i in range(LAYERS) for n, r in parts.items()}
    return out | {"einbettung": "embedding", "kopf": "head"}


#: name -> (build, expected matrix roles by full parameter name, attention implementation note)
ZOO: dict[str, tuple[Callable[[], nn.Module], dict[str, str]]] = {
    **{name: ((lambda s=s: PlainGPT(s)), _plain_expected(s)) for name, s in STYLES.items()},
    "raw_einsum": (RawGPT, _raw()),
    "hf_gpt2": (
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            n_embd=D,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        _gpt2(),
    ),  # fmt: skip
    "hf_gpt2_eager": (
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            n_embd=D,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        ),
        _gpt2(),
    ),  # fmt: skip
    "hf_llama": (_hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), _llama_like()),
    "hf_llama_eager": (
        _hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, attn_implementation="eager"),
        _llama_like(),
    ),  # fmt: skip
    "hf_mistral": (_hf("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), _llama_like()),
    "hf_qwen2": (_hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), _llama_like()),
    "hf_gemma": (_hf("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=8), _llama_like(head=None)),
    "hf_gpt_neox": (_hf("GPTNeoXConfig", "GPTNeoXForCausalLM"), _neox()),
    "hf_phi": (_hf("PhiConfig", "PhiForCausalLM"), _phi()),
    "hf_phi3": (_hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0), _phi3()),
    "hf_opt": (_hf("OPTConfig", "OPTForCausalLM", ffn_dim=FFN, word_embed_proj_dim=D, pad_token_id=1), _opt()),
    "hf_falcon": (_hf("FalconConfig", "FalconForCausalLM"), _falcon()),
    "hf_mixtral": (
        _hf("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        _moe("experts", shared=False),
    ),  # fmt: skip
    "hf_qwen2_moe": (
        _hf(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=FFN,
        ),
        _moe("experts", shared=True),
    ),  # fmt: skip
}


# ---------------------------------------------------------------- scrambling


class _Renamed(dict):
    """A module's ``_modules``/``_parameters``: stored (and listed) under meaningless names, still
    reachable under the original ones, so the model's own code runs unchanged."""

    def __init__(self, items: dict, salt: str):
        super().__init__()
        self.alias: dict[str, str] = {}
        for key, value in items.items():
            new = "z" + hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=3).hexdigest()
            self.alias[key] = new
            super().__setitem__(new, value)

    def _k(self, key):
        return self.alias.get(key, key)

    def __getitem__(self, key):
        return super().__getitem__(self._k(key))

    def __setitem__(self, key, value):
        if key not in self.alias and key not in self.alias.values():
            self.alias[key] = key
        super().__setitem__(self._k(key), value)

    def __delitem__(self, key):
        super().__delitem__(self._k(key))

    def __contains__(self, key):
        return super().__contains__(self._k(key))

    def get(self, key, default=None):
        return super().get(self._k(key), default)

    def pop(self, key, *default):
        return super().pop(self._k(key), *default)


def scramble(model: nn.Module) -> dict[str, str]:
    """Rename every submodule and parameter of ``model`` in place; returns {new name: old name}."""
    old: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        old.setdefault(id(p), n)
    for path, module in list(model.named_modules()):
        module._modules = _Renamed(module._modules, path + "m")
        module._parameters = _Renamed(module._parameters, path + "p")
    return {n: old[id(p)] for n, p in model.named_parameters(remove_duplicate=True)}
