"""Name-and-shape rules of :mod:`sentinel.roles`: the model's parameters and modules, preset
matching, and how fused QKV and gate/up matrices split when only names and shapes are known.

Why apart: :func:`sentinel.roles.assign_roles` combines these with the traced structure
(sentinel/role_infer.py) and the overrides; this module is what works on the meta device.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from sentinel.role_presets import _ACTIVATION, _GATED_FLAGS, _HEAD_DIM, _HEADS, _KV_HEADS, _LAYER, _Rule
from sentinel.role_types import FusedParts


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
    if layout == "te" and chain and type(chain[0]) is torch.nn.Linear:  # TE's own modules are never torch's
        layout, layout_rule = "contiguous", "; layout: contiguous (a torch nn.Linear, not a Transformer Engine module)"
    elif layout == "te":  # fused TE QKV: interleaved unless the attention module says otherwise
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
