"""Parameter roles: which weight matrix is an embedding, a query, an MLP down projection...

Stabilising transforms act per role (WeSaR's gates follow Table 1 of Nishida et al.: W_e, W_q,
W_k, W_v, W_o, W_u, W_d, W_p; update-ratio clamps differ for the small W_o and W_d), so they
need every weight matrix's role, its layer index, and the model's N (layers), d (hidden size)
and d_ffn.  :func:`assign_roles` derives them from parameter names and shapes only, so a model
built on the meta device costs nothing:

    rm = assign_roles(model)                    # preset "auto": the preset that assigns most
    rm["h.0.attn.c_attn.weight"].role           # "qkv"
    rm["h.0.attn.c_attn.weight"].fused_parts    # q 128 | k 128 | v 128 (dim 0, contiguous)
    rm.unassigned                               # matrices no rule matched: never guessed

Presets (patterns in ``PRESETS``; docs/roles.md lists them): ``llama`` (Hugging Face
LLaMA-style), ``gpt2`` (Hugging Face GPT-2 and nanoGPT), ``megatron`` (Megatron-LM legacy and
Megatron-Core), ``te`` (Transformer Engine modules), ``generic`` (only the common embedding,
head, norm and bias names every preset also knows).  ``overrides`` (regex, full match on the
parameter name, to role) are applied last.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.typedconfig import ConfigError

log = logging.getLogger("sentinel")

__all__ = [
    "MATRIX_ROLES",
    "PRESETS",
    "PRESET_CHOICES",
    "ROLES",
    "FusedParts",
    "ParamRole",
    "RoleError",
    "RoleMap",
    "assign_roles",
    "roles_from_config",
    "validate_overrides",
]

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


class RoleError(ConfigError):
    """A bad preset or override, or an ``auto`` choice that is ambiguous."""


# ---------------------------------------------------------------- result types


@dataclass(frozen=True)
class FusedParts:
    """How a fused matrix (qkv, gate_up) splits into its parts along dimension ``dim``.

    ``layout`` is ``contiguous`` (all of q, then k, then v; gate then up) or ``interleaved``
    (Megatron and fused Transformer Engine QKV: per query group, that group's q heads, then its
    k head, then its v head; ``groups`` is the number of groups when known).  ``sizes`` are
    the total rows of each part (None when they cannot be inferred); ``rule`` says how they
    were decided.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...] | None
    dim: int
    layout: str
    groups: int | None
    rule: str

    def __str__(self) -> str:
        sizes = self.sizes or (None,) * len(self.names)
        parts = " | ".join(f"{n} {'?' if s is None else s}" for n, s in zip(self.names, sizes))
        groups = f" x{self.groups} groups" if self.layout == "interleaved" and self.groups else ""
        return f"{parts} (dim {self.dim}, {self.layout}{groups})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "sizes": None if self.sizes is None else list(self.sizes),
            "dim": self.dim,
            "layout": self.layout,
            "groups": self.groups,
            "rule": self.rule,
        }


@dataclass(frozen=True)
class ParamRole:
    """The role of one parameter (one Parameter object; tied names are ``aliases``)."""

    role: str
    layer: int | None
    shape: tuple[int, ...]
    fused_parts: FusedParts | None = None
    aliases: tuple[str, ...] = ()
    #: role each alias matched on its own (None where it matched nothing), in ``aliases`` order
    alias_roles: tuple[str | None, ...] = ()
    #: what assigned the role: "preset <name>: <pattern>" or "override <regex>"
    source: str = ""

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "fused_parts": None if self.fused_parts is None else self.fused_parts.to_dict(),
            "aliases": list(self.aliases),
            "alias_roles": list(self.alias_roles),
            "source": self.source,
        }


@dataclass
class RoleMap(Mapping):
    """Parameter name -> :class:`ParamRole`, for every parameter that has a role.

    Keys are the names ``model.named_parameters()`` yields (a tied parameter appears once, under
    its first name; :meth:`get` also resolves its other names).  Matrices (dim >= 2) without a
    role are in ``unassigned``; vectors without one in ``unassigned_vectors``.
    """

    roles: dict[str, ParamRole]
    unassigned: list[str]
    unassigned_vectors: list[str]
    shapes: dict[str, tuple[int, ...]]
    preset: str
    #: matrices each preset assigned (only the presets that were tried: all of them under auto)
    preset_scores: dict[str, int]
    auto: bool
    n_layers: int | None
    d_model: int | None
    d_ffn: int | None
    n_heads: int | None
    n_kv_heads: int | None
    notes: list[str] = field(default_factory=list)
    _alias: dict[str, str] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> ParamRole:
        return self.roles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.roles)

    def __len__(self) -> int:
        return len(self.roles)

    def get(self, name: str, default: Any = None) -> Any:
        """The role of ``name``, which may also be a tied alias (e.g. ``lm_head.weight``)."""
        return self.roles.get(self._alias.get(name, name), default)

    def names(self, role: str) -> list[str]:
        """Parameter names with ``role``, in model order."""
        if role not in ROLES:
            raise RoleError(f"unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        return [n for n, r in self.roles.items() if r.role == role]

    def role_by_name(self) -> dict[str, str]:
        """``{parameter name: role}`` for every name with a role, tied aliases included."""
        out = {name: r.role for name, r in self.roles.items()}
        out.update({name: self.roles[canon].role for name, canon in self._alias.items() if canon in self.roles})
        return out

    @property
    def matrices(self) -> list[str]:
        """Every matrix (dim >= 2), assigned or not, in model order."""
        return [n for n, s in self.shapes.items() if len(s) >= 2]

    @property
    def complete(self) -> bool:
        """True when every matrix has a role."""
        return not self.unassigned

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "auto": self.auto,
            "preset_scores": dict(self.preset_scores),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_ffn": self.d_ffn,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "parameters": {n: r.to_dict() for n, r in self.roles.items()},
            "unassigned": list(self.unassigned),
            "unassigned_vectors": list(self.unassigned_vectors),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------- presets


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


# ---------------------------------------------------------------- helpers


def validate_overrides(overrides: Mapping[str, str] | None, key: str = "overrides") -> dict[str, re.Pattern]:
    """Compile ``{regex: role}``; a bad regex or an unknown role raises :class:`RoleError`."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise RoleError(f"{key}: {overrides!r} is not a mapping of regex to role")
    compiled = {}
    for pattern, role in overrides.items():
        if not isinstance(pattern, str):
            raise RoleError(f"{key}: key {pattern!r} is not a string (a regex on the parameter name)")
        if role not in ROLES:
            raise RoleError(f"{key}[{pattern!r}]: unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
        try:
            compiled[pattern] = re.compile(pattern)
        except re.error as exc:
            raise RoleError(f"{key}: {pattern!r} is not a valid regular expression: {exc}") from None
    return compiled


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _out_dim(module: torch.nn.Module | None) -> int:
    """The output dimension of a module's weight: 0 for nn.Linear (out, in), 1 for HF's Conv1D (in, out)."""
    return 1 if module is not None and type(module).__name__ == "Conv1D" else 0


def _lookup(objs: list[Any], names: tuple[str, ...], kind: type = int) -> Any:
    """The first attribute among ``names`` found on an object of ``objs`` (or its config/cfg/args)."""
    for obj in objs:
        if obj is None:
            continue
        holders = [obj] + [getattr(obj, sub, None) for sub in ("config", "cfg", "args")]
        for holder in holders:
            if holder is None:
                continue
            for attr in names:
                value = getattr(holder, attr, None)
                if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                    return value
    return None


class _Model:
    """Names, shapes and module context of a model's parameters."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        groups: dict[int, list[str]] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            self.params[name] = p
        # canonical name (first, as model.named_parameters() yields it) -> all names
        self.groups = {names[0]: names for names in groups.values()}
        self.shapes = {names[0]: tuple(self.params[names[0]].shape) for names in groups.values()}

    def module_of(self, name: str) -> torch.nn.Module | None:
        return self.modules.get(name.rpartition(".")[0])

    def chain(self, name: str) -> list[torch.nn.Module]:
        """The module owning ``name``, its parents, up to the root."""
        path, out = name.rpartition(".")[0], []
        while True:
            if path in self.modules:
                out.append(self.modules[path])
            if not path:
                return out
            path = path.rpartition(".")[0]

    def shape(self, name: str) -> tuple[int, ...] | None:
        p = self.params.get(name)
        return None if p is None else tuple(p.shape)


def _match(rules: tuple[_Rule, ...], name: str, is_matrix: bool) -> _Rule | None:
    for rule in rules:
        if rule.matrix == is_matrix and rule.pattern.search(name):
            return rule
    return None


def _preset_pass(m: _Model, rules: tuple[_Rule, ...]) -> dict[str, tuple[str, _Rule, str]]:
    """canonical name -> (role or _UP_OR_GATE_UP, rule, the name that matched) for every match."""
    out = {}
    for canon, names in m.groups.items():
        is_matrix = len(m.shapes[canon]) >= 2
        for name in names:
            rule = _match(rules, name, is_matrix)
            if rule is not None:
                out[canon] = (rule.role, rule, name)
                break
    return out


# ---------------------------------------------------------------- fused matrices


def _qkv_parts(m: _Model, name: str, layout: str, d_model: int | None) -> FusedParts:
    shape = m.shapes.get(name) or m.shape(name)
    chain = m.chain(name)
    dim = _out_dim(chain[0] if chain else None)
    rows = shape[dim]
    layout_rule = ""
    if layout == "te":  # fused TE QKV: interleaved unless the attention module says otherwise
        flag = _lookup(chain, ("qkv_weight_interleaved",), bool)
        layout = "contiguous" if flag is False else "interleaved"
        layout_rule = (
            f"; layout from qkv_weight_interleaved={flag}"
            if flag is not None
            else "; layout: TE's default for fused QKV (qkv_weight_interleaved not found)"
        )
    heads, kv = _lookup(chain, _HEADS), _lookup(chain, _KV_HEADS)
    head_dim = _lookup(chain, _HEAD_DIM)
    kv = kv or heads
    sizes, rule = None, ""
    if heads:
        hd = head_dim
        if hd is None and d_model and d_model % heads == 0:
            hd = d_model // heads
        if hd is None and rows % (heads + 2 * kv) == 0:
            hd = rows // (heads + 2 * kv)
        if hd and (heads + 2 * kv) * hd == rows:
            sizes = (heads * hd, kv * hd, kv * hd)
            rule = f"from the head counts: {heads} query heads, {kv} key/value heads, head size {hd}"
        else:
            rule = f"head counts found ({heads} query, {kv} key/value) do not fit {rows} rows; "
    if sizes is None and d_model and rows > d_model and (rows - d_model) % 2 == 0:
        kv_rows = (rows - d_model) // 2
        sizes = (d_model, kv_rows, kv_rows)
        rule += f"from d={d_model}: q has d rows, k and v share the other {rows - d_model} equally"
    elif sizes is None and rows % 3 == 0:
        sizes = (rows // 3,) * 3
        rule += "equal thirds (neither head counts nor d inferable)"
    elif sizes is None:
        rule += f"cannot split {rows} rows: no head counts, d unknown, not divisible by 3"
    groups = None
    if layout == "interleaved":
        groups = kv if heads else None
    return FusedParts(("q", "k", "v"), sizes, dim, layout, groups, rule + layout_rule)


def _gate_up_parts(m: _Model, name: str) -> FusedParts:
    shape = m.shapes.get(name) or m.shape(name)
    chain = m.chain(name)
    dim = _out_dim(chain[0] if chain else None)
    rows = shape[dim]
    if rows % 2:
        return FusedParts(("gate", "up"), None, dim, "contiguous", None, f"{rows} rows cannot split in halves")
    return FusedParts(
        ("gate", "up"),
        (rows // 2, rows // 2),
        dim,
        "contiguous",
        None,
        "halves, gate first (the Megatron, Transformer Engine and Phi-3 convention)",
    )


def _resolve_up(m: _Model, name: str, rule: _Rule, notes: list[str]) -> str:
    """up or gate_up for an MLP input matrix (Megatron dense_h_to_4h / linear_fc1, TE fc1_weight)."""
    chain = m.chain(name)
    flag: bool | None = None
    evidence = ""
    activation = _lookup(chain[:3], _ACTIVATION, str)
    if activation is not None:
        act = activation.lower()
        flag = act.endswith("glu")  # glu, geglu, reglu, swiglu, qgeglu, sreglu, clamped_swiglu; not gelu
        evidence = f"activation {activation!r}"
    else:
        gated = _lookup(chain, _GATED_FLAGS, bool)
        if gated is not None:
            flag, evidence = gated, f"gated flag {gated}"
    by_shape: bool | None = None
    shape = m.shapes.get(name) or m.shape(name)
    partner = rule.partner and re.sub(rule.partner[0], rule.partner[1], name)
    down = m.shape(partner) if partner else None
    if down is not None and len(down) >= 2:
        rows = shape[_out_dim(chain[0] if chain else None)]
        ffn = down[1 - _out_dim(m.module_of(partner))]
        if rows == 2 * ffn:
            by_shape = True
        elif rows == ffn:
            by_shape = False
    if flag is None and by_shape is None:
        notes.append(f"{name}: cannot tell up from gate_up (no activation, flag or down matrix); assumed up")
        return "up"
    if flag is not None and by_shape is not None and flag != by_shape:
        notes.append(
            f"{name}: {evidence} says {'gated' if flag else 'not gated'} but the shape says otherwise; using the shape"
        )
        return "gate_up" if by_shape else "up"
    return "gate_up" if (flag if flag is not None else by_shape) else "up"


# ---------------------------------------------------------------- assignment


def _score(m: _Model, matches: dict[str, tuple[str, _Rule, str]]) -> int:
    return sum(1 for canon in matches if len(m.shapes[canon]) >= 2)


def _signature(m: _Model, matches: dict[str, tuple[str, _Rule, str]]) -> dict[str, str]:
    """The matrix roles a preset gives (what an ``auto`` tie must agree on)."""
    return {canon: role for canon, (role, _, _) in matches.items() if len(m.shapes[canon]) >= 2}


def _choose(m: _Model) -> tuple[str, dict[str, int], list[str]]:
    passes = {name: _preset_pass(m, PRESETS[name]) for name in PRESET_NAMES if name != "generic"}
    scores = {name: _score(m, matches) for name, matches in passes.items()}
    best = max(scores.values(), default=0)
    tied = [name for name, s in scores.items() if s == best]
    notes = []
    if len(tied) == 1:
        return tied[0], scores, notes
    signatures = [_signature(m, passes[name]) for name in tied]
    if any(sig != signatures[0] for sig in signatures[1:]):
        raise RoleError(
            f"preset 'auto' is ambiguous: presets {', '.join(tied)} each assign {best} matrices, with different "
            "roles; choose one (roles.preset in the config, or --preset)"
        )
    generic = _preset_pass(m, PRESETS["generic"])
    if _signature(m, generic) == signatures[0]:
        return "generic", scores, notes  # only the common names matched
    notes.append(f"auto: presets {', '.join(tied)} assign the same roles; using {tied[0]}")
    return tied[0], scores, notes


def assign_roles(model: torch.nn.Module, preset: str = "auto", overrides: Mapping[str, str] | None = None) -> RoleMap:
    """Give every parameter of ``model`` its role, from its name (and shape, for fused matrices).

    ``preset`` is one of :data:`PRESET_CHOICES`; ``auto`` tries every preset and keeps the one that
    assigns the most matrices (``preset_scores`` has the counts), and raises :class:`RoleError`
    when two presets tie with different roles.  ``overrides`` maps a regex (full match on a
    parameter name, or on any of a tied parameter's names) to a role and wins over the preset.
    Matrices no rule matched are listed in ``unassigned``: no role is ever guessed.
    """
    if preset not in PRESET_CHOICES:
        raise RoleError(f"unknown preset {preset!r}; allowed: {', '.join(PRESET_CHOICES)}")
    compiled = validate_overrides(overrides)
    m = _Model(model)
    notes: list[str] = []
    if preset == "auto":
        chosen, scores, notes = _choose(m)
    else:
        chosen, scores = preset, {}
    matches = _preset_pass(m, PRESETS[chosen])
    if not scores:
        scores = {chosen: _score(m, matches)}

    # roles, before fused-matrix resolution
    assigned: dict[str, tuple[str, str, str]] = {}  # canon -> (role, source, layout)
    for canon, (role, rule, matched) in matches.items():
        if role == _UP_OR_GATE_UP:
            role = _resolve_up(m, matched, rule, notes)
        assigned[canon] = (role, f"preset {chosen}: {rule.pattern.pattern}", rule.layout)
    used = set()
    for canon, names in m.groups.items():
        for pattern, regex in compiled.items():
            if any(regex.fullmatch(n) for n in names):
                assigned[canon] = (overrides[pattern], f"override {pattern}", "contiguous")
                used.add(pattern)
    for pattern in compiled:
        if pattern not in used:
            notes.append(f"override {pattern!r} matches no parameter")
            log.warning("sentinel roles: override %r matches no parameter", pattern)

    # architecture sizes
    d_model = None
    for canon, (role, _, _) in assigned.items():
        if role == "embedding" and len(m.shapes[canon]) == 2:
            d_model = m.shapes[canon][1]
            break
    root = [model]
    if d_model is None:
        d_model = _lookup(root, ("hidden_size", "n_embd", "d_model"))
    d_ffn = None
    for canon, (role, _, _) in assigned.items():
        shape = m.shapes[canon]
        if len(shape) != 2 or role not in ("down", "up", "gate", "gate_up"):
            continue
        out = _out_dim(m.module_of(canon))
        d_ffn = shape[1 - out] if role == "down" else shape[out] // (2 if role == "gate_up" else 1)
        break

    layers = sorted(
        {_layer_of(c) for c, (r, _, _) in assigned.items() if r in BLOCK_ROLES and len(m.shapes[c]) >= 2} - {None}
    )
    n_layers = len(layers) or None
    if layers and layers != list(range(layers[0], layers[0] + len(layers))):
        notes.append(f"layer indices are not contiguous ({layers[0]}..{layers[-1]}); N counts the distinct ones")
    elif layers and layers[0] != 0:
        notes.append(f"layer indices start at {layers[0]} (a pipeline stage?); N counts the layers present")
    declared = _lookup(root, _N_LAYERS)
    if declared is not None and n_layers is not None and declared != n_layers:
        notes.append(f"the model's config declares {declared} layers but {n_layers} hold matrices")

    roles: dict[str, ParamRole] = {}
    alias: dict[str, str] = {}
    all_rules = PRESETS[chosen]
    unassigned, unassigned_vectors = [], []
    for canon, names in m.groups.items():
        shape = m.shapes[canon]
        for other in names[1:]:
            alias[other] = canon
        if canon not in assigned:
            (unassigned if len(shape) >= 2 else unassigned_vectors).append(canon)
            continue
        role, source, layout = assigned[canon]
        fused = None
        if role == "qkv" and len(shape) >= 2:
            fused = _qkv_parts(m, canon, layout, d_model)
        elif role == "gate_up" and len(shape) >= 2:
            fused = _gate_up_parts(m, canon)
        alias_roles = []
        for other in names[1:]:
            rule = _match(all_rules, other, len(shape) >= 2)
            alias_roles.append(None if rule is None else rule.role if rule.role != _UP_OR_GATE_UP else role)
        layer = None if role in ("embedding", "pos_embedding", "head") else _layer_of(canon)
        roles[canon] = ParamRole(role, layer, shape, fused, tuple(names[1:]), tuple(alias_roles), source)

    heads = _lookup([model, *m.modules.values()], _HEADS)
    kv_heads = _lookup([model, *m.modules.values()], _KV_HEADS) if heads else None
    return RoleMap(
        roles=roles,
        unassigned=unassigned,
        unassigned_vectors=unassigned_vectors,
        shapes=dict(m.shapes),
        preset=chosen,
        preset_scores=scores,
        auto=preset == "auto",
        n_layers=n_layers,
        d_model=d_model,
        d_ffn=d_ffn,
        n_heads=heads,
        n_kv_heads=kv_heads or heads,
        notes=notes,
        _alias=alias,
    )


def roles_from_config(model: torch.nn.Module, config: Any) -> RoleMap:
    """:func:`assign_roles` with ``config.roles`` (a :class:`sentinel.Config` or its ``roles`` section)."""
    section = getattr(config, "roles", config)
    return assign_roles(model, preset=section.preset, overrides=section.overrides)
