"""The result types of :func:`sentinel.roles.assign_roles`: each parameter's role, fused splits, the map."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sentinel.role_presets import ROLES
from sentinel_contract.typedconfig import ConfigError

__all__ = ["FusedParts", "ParamRole", "RoleError", "RoleMap"]


class RoleError(ConfigError):
    """A bad preset or override, or an ``auto`` choice that is ambiguous."""


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
    #: the traced dataflow (sentinel.role_infer.Structure), None when names alone were used
    structure: Any = None
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
            "structure": None if self.structure is None else _structure_dict(self.structure),
        }


def _structure_dict(st: Any) -> dict[str, Any]:
    return {
        "traced": st.error is None,
        "error": st.error,
        "tokens": list(st.tokens),
        "attentions": [
            {"index": a.index, "kind": a.kind, "module": a.module, "q": a.q, "k": a.k, "v": a.v, "o": a.o}
            for a in st.attentions
        ],
        "roles": dict(st.roles),
    }
