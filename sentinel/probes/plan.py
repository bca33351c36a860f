"""Which modules the probes watch, found from the parameter roles (sentinel/roles.py).

Nothing is matched on module classes where a role says it better: a module holding a q, k, v,
qkv, o, up, gate, gate_up or down matrix is a *linear* (its output role: FC2 when it holds a
down matrix, as Transformer Engine's fused ``LayerNormMLP`` does, then Proj, QKV, FC1); the
*block* of a matrix is the module path up to its layer index (``h.3``, ``model.layers.3``);
the *attention* module of a block is the deepest module holding all its q/k/v/qkv and o
matrices, its *MLP* the deepest holding all its up/gate/down matrices.  Embeddings and the
head are the modules holding those roles (a tied head keeps its own role).  *Norms* are the
modules holding a norm-role parameter, or named ``*Norm`` by class, and fused norm+linear
modules.  The FFN's input x′ (Takase's σx′) is read at the block's last direct-child norm (the
pre-FFN norm of pre-LN blocks) or, for a fused MLP with its own norm, at the MLP's input.

Each probed module also has a role for the layout's ``roles`` (docs/protocol.md): a linear the
role of the matrix that made it one (the first of ``OUTPUT_ROLE`` it holds), an embedding
``embedding`` or ``pos_embedding``, a head ``head``, a norm ``norm``, an attention module
``attention``, a block ``block`` (:meth:`ProbePlan.row_roles`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from sentinel.roles import BLOCK_ROLES, RoleMap

__all__ = ["OUTPUT_ROLE", "ProbePlan", "make_plan"]

#: matrix role -> the output role of the linear (QKV, Proj, FC1, FC2), in precedence order
OUTPUT_ROLE = {
    "down": "FC2",
    "o": "Proj",
    "qkv": "QKV",
    "q": "QKV",
    "k": "QKV",
    "v": "QKV",
    "gate_up": "FC1",
    "up": "FC1",
    "gate": "FC1",
}
_ATTN_ROLES = ("q", "k", "v", "qkv", "o")
_MLP_ROLES = ("up", "gate", "gate_up", "down")
_BLOCK = re.compile(r"^(.*?(?:^|\.)\d+)\.")


@dataclass
class BlockPlan:
    name: str
    attention: str | None = None
    mlp: str | None = None
    ffn_input: str | None = None  # module whose input is x'
    qkv: list[str] = field(default_factory=list)  # parameter names
    o: list[str] = field(default_factory=list)
    fc1: list[str] = field(default_factory=list)
    fc2: list[str] = field(default_factory=list)


@dataclass
class ProbePlan:
    linears: dict[str, str]  # module -> output role
    blocks: dict[str, BlockPlan]
    attentions: dict[str, str]  # attention module -> block
    embeddings: list[str]
    norms: list[str]
    heads: list[str]
    d_model: int | None
    d_ffn: int | None
    n_heads: int | None
    notes: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)  # linear or embedding module -> its matrix's role

    def row_roles(self, group: str, rows: tuple[str, ...]) -> tuple[str, ...]:
        """The role of each row of probe group ``group`` (module names), "" where the plan knows none."""
        fixed = {"attention": "attention", "block": "block", "norm": "norm", "head": "head"}.get(group)
        return tuple(fixed or self.roles.get(r, "") for r in rows)


def _role_of(rm: RoleMap, name: str) -> str | None:
    pr = rm.get(name)
    if pr is None:
        return None
    if name in pr.aliases:
        own = pr.alias_roles[pr.aliases.index(name)]
        return own or pr.role
    return pr.role


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _is_norm_class(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _blocks_by_layer(model: torch.nn.Module, rm: RoleMap, modules: dict) -> dict[str, str]:
    """Block module of each block matrix whose name holds no layer index (names that say nothing):
    the deepest module holding every matrix of its (traced) layer."""
    layers: dict[int, list[str]] = {}
    for pname, r in rm.items():
        if r.role in BLOCK_ROLES and r.layer is not None and _BLOCK.match(pname) is None:
            layers.setdefault(r.layer, []).append(pname)
    out = {}
    for names in layers.values():
        common = _common([n.rpartition(".")[0] for n in names])
        if common and common in modules:
            out.update(dict.fromkeys(names, common))
    return out


def _traced_attention(rm: RoleMap, modules: dict, param_block: dict[str, str]) -> dict[str, str]:
    """Block -> the module that made its attention call in the traced forward (sentinel/role_infer.py)."""
    st = getattr(rm, "structure", None)
    out: dict[str, str] = {}
    if st is None or getattr(st, "error", None) is not None:
        return out
    for site in st.attentions:
        block = next((param_block[p] for p in (*site.q, *site.o) if p in param_block), None)
        if block is not None and site.module in modules and block not in out:
            out[block] = site.module
    return out


def make_plan(model: torch.nn.Module, rm: RoleMap) -> ProbePlan:
    """The modules to probe in ``model``, from its role map ``rm``."""
    modules = dict(model.named_modules())
    linear_roles: dict[str, set[str]] = {}
    blocks: dict[str, BlockPlan] = {}
    embeddings, heads, norm_set = [], [], set()
    notes: list[str] = []
    module_roles: dict[str, str] = {}
    by_layer = _blocks_by_layer(model, rm, modules)
    param_block: dict[str, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        role = _role_of(rm, pname)
        mod = pname.rpartition(".")[0]
        if role is None or mod not in modules:
            continue
        if role == "norm":
            norm_set.add(mod)
        elif role in ("embedding", "pos_embedding") and mod not in embeddings:
            embeddings.append(mod)
            module_roles[mod] = role
        elif role == "head" and mod not in heads:
            heads.append(mod)
        elif role in BLOCK_ROLES and p.dim() >= 2:
            linear_roles.setdefault(mod, set()).add(role)
            m = _BLOCK.match(pname)
            block = m.group(1) if m is not None and m.group(1) in modules else by_layer.get(pname)
            if block is None:
                continue
            param_block[pname] = block
            b = blocks.setdefault(block, BlockPlan(block))
            group = {"o": b.o, "down": b.fc2}.get(role, b.qkv if role in _ATTN_ROLES else b.fc1)
            group.append(pname)
    for name, module in modules.items():
        if name and _is_norm_class(module) and not any(True for _ in module.children()):
            norm_set.add(name)
    linears = {}
    for mod, roles in linear_roles.items():
        module_roles[mod] = next(r for r in OUTPUT_ROLE if r in roles)
        linears[mod] = OUTPUT_ROLE[module_roles[mod]]
    traced = _traced_attention(rm, modules, param_block)
    attentions = {}
    for b in blocks.values():
        attn = [n.rpartition(".")[0] for n in b.qkv + b.o]
        if b.name in traced:
            b.attention = traced[b.name]
            attentions[b.attention] = b.name
        elif b.qkv and b.o:
            b.attention = _common(attn)
            if b.attention in modules and b.attention.startswith(b.name):
                attentions[b.attention] = b.name
            else:
                b.attention = None
        mlp = [n.rpartition(".")[0] for n in b.fc1 + b.fc2]
        if b.fc1 and b.fc2:
            b.mlp = _common(mlp) if _common(mlp) in modules else None
        if b.mlp is not None and b.mlp in norm_set:
            b.ffn_input = b.mlp
        else:
            direct = [n for n in modules if n.rpartition(".")[0] == b.name and n in norm_set]
            if len(direct) >= 2:
                b.ffn_input = direct[-1]
        if b.attention is None or b.ffn_input is None:
            notes.append(f"{b.name}: attention module {b.attention}, FFN input {b.ffn_input}")
    order = {name: i for i, name in enumerate(modules)}
    return ProbePlan(
        linears=dict(sorted(linears.items(), key=lambda kv: order[kv[0]])),
        blocks=dict(sorted(blocks.items(), key=lambda kv: order[kv[0]])),
        attentions=dict(sorted(attentions.items(), key=lambda kv: order[kv[0]])),
        embeddings=sorted(embeddings, key=order.__getitem__),
        norms=sorted(norm_set, key=order.__getitem__),
        heads=sorted(heads, key=order.__getitem__),
        d_model=rm.d_model,
        d_ffn=rm.d_ffn,
        n_heads=rm.n_heads,
        notes=notes,
        roles=module_roles,
    )
