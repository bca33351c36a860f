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

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from sentinel.model_call import unwrap
from sentinel.role_infer import Structure, infer
from sentinel.role_names import (
    _gate_up_parts,
    _layer_of,
    _lookup,
    _match,
    _Model,
    _out_dim,
    _preset_pass,
    _qkv_parts,
    _resolve_up,
)
from sentinel.role_presets import (
    _HEADS,
    _KV_HEADS,
    _N_LAYERS,
    _UP_OR_GATE_UP,
    BLOCK_ROLES,
    MATRIX_ROLES,
    PRESET_CHOICES,
    PRESET_NAMES,
    PRESETS,
    ROLES,
    VECTOR_ROLES,
    _Rule,
)
from sentinel.role_trace import trace
from sentinel.role_types import FusedParts, ParamRole, RoleError, RoleMap

log = logging.getLogger("sentinel")

__all__ = [
    "BLOCK_ROLES",
    "MATRIX_ROLES",
    "PRESETS",
    "PRESET_CHOICES",
    "PRESET_NAMES",
    "ROLES",
    "VECTOR_ROLES",
    "FusedParts",
    "ParamRole",
    "RoleError",
    "RoleMap",
    "Structure",
    "assign_roles",
    "trace_structure",
    "roles_from_config",
    "validate_overrides",
]


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


def _has_forward(model: torch.nn.Module) -> bool:
    root = unwrap(model)[0] or model  # torch.compile's wrapper keeps nn.Module.forward
    return type(root).forward is not torch.nn.Module.forward


def trace_structure(model: torch.nn.Module, m: _Model | None = None) -> Structure:
    """The structural roles of ``model`` from one traced forward (sentinel/role_infer.py); never raises."""
    m = m or _Model(model)
    try:
        return infer(trace(model), dict(m.shapes), m.groups)
    except Exception as exc:
        return Structure(error=f"structure analysis failed: {type(exc).__name__}: {exc}")


def _fused_from(st: Structure, canon: str, shape: tuple[int, ...]) -> FusedParts | None:
    f = st.fused.get(canon)
    dim = st.out_dims.get(canon)
    if f is None or dim is None or sum(f["sizes"]) != shape[dim]:
        return None
    return FusedParts(f["names"], f["sizes"], dim, f["layout"], f["groups"], f["rule"])


def assign_roles(
    model: torch.nn.Module,
    preset: str = "auto",
    overrides: Mapping[str, str] | None = None,
    *,
    structure: bool | Structure = True,
) -> RoleMap:
    """Give every parameter of ``model`` its role: from the dataflow of one traced forward, from
    its name (and shape, for fused matrices), and from ``overrides``, in rising precedence.

    ``structure`` (default True) traces one forward on 8 tokens (:func:`trace_structure`; pass a
    :class:`Structure` to reuse one, False to use names only); where it gives a role it wins
    over the preset (a note records any disagreement), the preset fills in the rest.  A trace
    that fails adds a note and leaves the presets alone.  ``preset`` is one of
    :data:`PRESET_CHOICES`; ``auto`` tries every preset and keeps the one that assigns the most
    matrices (``preset_scores`` has the counts), and raises :class:`RoleError` when two presets
    tie with different roles and the trace does not settle every matrix.  ``overrides`` maps a
    regex (full match on a parameter name, or on any of a tied parameter's names) to a role and
    wins over both.  Matrices nothing assigned are listed in ``unassigned``: no role is guessed.
    """
    if preset not in PRESET_CHOICES:
        raise RoleError(f"unknown preset {preset!r}; allowed: {', '.join(PRESET_CHOICES)}")
    compiled = validate_overrides(overrides)
    m = _Model(model)
    notes: list[str] = []
    st: Structure | None = None
    if isinstance(structure, Structure):
        st = structure
    elif structure and _has_forward(model):
        st = trace_structure(model, m)
    if st is not None and not st.ok:
        notes.append(f"structure not traced ({st.error}); roles from the parameter names only")
    struct_roles = st.roles if st is not None and st.ok else {}
    complete = bool(struct_roles) and all(c in struct_roles for c in m.groups if len(m.shapes[c]) >= 2)
    if preset == "auto":
        try:
            chosen, scores, notes_ = _choose(m)
            notes += notes_
        except RoleError as exc:
            if not complete:
                raise
            chosen, scores = "generic", {}
            notes.append(f"{exc}; the traced structure assigns every matrix, so the names are not needed")
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
    disagree = []
    confirmed: set[str] = set()
    for canon, role in struct_roles.items():
        if canon not in m.groups:
            continue
        before = assigned.get(canon)
        if before is not None and before[0] != role and len(m.shapes[canon]) >= 2:
            disagree.append(f"{canon} ({before[0]} by name, {role} by structure)")
        if before is not None and before[0] == role:
            assigned[canon] = before
            confirmed.add(canon)
        elif before is None or len(m.shapes[canon]) >= 2:
            assigned[canon] = (role, f"structure: {role} in the traced dataflow", "structure")
            confirmed.add(canon)
    if disagree:
        notes.append("the dataflow overrides the name preset for " + ", ".join(disagree))
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

    def out_dim(canon: str) -> int:
        if st is not None and canon in st.out_dims:
            return st.out_dims[canon]
        return _out_dim(m.module_of(canon))

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
        if len(shape) not in (2, 3) or role not in ("down", "up", "gate", "gate_up"):
            continue
        out = out_dim(canon)
        in_dim = len(shape) - 1 if out != len(shape) - 1 else len(shape) - 2
        d_ffn = shape[in_dim] if role == "down" else shape[out] // (2 if role == "gate_up" else 1)
        break

    def layer_of(canon: str) -> int | None:
        layer = _layer_of(canon)
        if layer is None and st is not None:
            layer = st.layers.get(canon)
        return layer

    layers = sorted(
        {layer_of(c) for c, (r, _, _) in assigned.items() if r in BLOCK_ROLES and len(m.shapes[c]) >= 2} - {None}
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
            fused = _qkv_parts(m, canon, "contiguous" if layout == "structure" else layout, d_model)
        elif role == "gate_up" and len(shape) >= 2:
            fused = _gate_up_parts(m, canon)
        traced = _fused_from(st, canon, shape) if fused is not None and canon in confirmed else None
        if traced is not None:
            same = traced.sizes == fused.sizes and traced.names == fused.names
            fused = dataclasses.replace(traced, rule=traced.rule + (f"; the same as {fused.rule}" if same else ""))
        alias_roles = []
        for other in names[1:]:
            if st is not None and other in st.name_roles:
                alias_roles.append(st.name_roles[other])
                continue
            rule = _match(all_rules, other, len(shape) >= 2)
            alias_roles.append(None if rule is None else rule.role if rule.role != _UP_OR_GATE_UP else role)
        layer = None if role in ("embedding", "pos_embedding", "head") else layer_of(canon)
        roles[canon] = ParamRole(role, layer, shape, fused, tuple(names[1:]), tuple(alias_roles), source)

    heads = _lookup([model, *m.modules.values()], _HEADS)
    kv_heads = _lookup([model, *m.modules.values()], _KV_HEADS) if heads else None
    if heads is None and st is not None and st.heads:
        heads, kv_heads = st.heads, st.kv_heads
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
        structure=st,
        _alias=alias,
    )


def roles_from_config(model: torch.nn.Module, config: Any) -> RoleMap:
    """:func:`assign_roles` with ``config.roles`` (a :class:`sentinel.Config` or its ``roles`` section)."""
    section = getattr(config, "roles", config)
    return assign_roles(
        model, preset=section.preset, overrides=section.overrides, structure=getattr(section, "structure", True)
    )
