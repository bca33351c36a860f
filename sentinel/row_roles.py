"""The role of each parameter-statistics row, as it travels in the layout's ``roles`` (docs/protocol.md).

Why: the agent must tell weight matrices from gains and biases, and know each matrix's role,
whatever the model's naming style (a LayerNorm gain named ``ln1`` is no matrix).  The role map
(sentinel/roles.py) names what its traced structure and presets recognise; every other tensor still gets
``"matrix"`` (ndim ≥ 2) or ``"vector"`` (ndim < 2), so the agent always knows that much.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sentinel.roles import RoleMap, roles_from_config

log = logging.getLogger("sentinel")

__all__ = ["param_roles", "require", "role_map_or_error"]


def role_map_or_error(model: torch.nn.Module, config: Any) -> tuple[RoleMap | None, Exception | None]:
    """The role map of ``config.roles``, or the error that prevented it (never raised here)."""
    try:
        return roles_from_config(model, config), None
    except Exception as exc:
        return None, exc


def require(role_map: RoleMap | None, error: Exception | None) -> RoleMap:
    """The role map, for the parts that cannot work without one: they raise at attach, as a config error would."""
    if role_map is None:
        raise error if error is not None else ValueError("no role map")
    return role_map


def _shape_role(p: torch.Tensor) -> str:
    return "matrix" if p.dim() >= 2 else "vector"


def param_roles(role_map: RoleMap | None, names: tuple[str, ...], params: list[torch.Tensor]) -> tuple[str, ...]:
    """Per optimizer tensor: its role in ``role_map``, else ``"matrix"`` or ``"vector"`` by its number of dimensions."""
    try:
        out = []
        for name, p in zip(names, params):
            r = role_map.get(name) if role_map is not None else None
            out.append(r.role if r is not None else _shape_role(p))
        return tuple(out)
    except Exception:
        log.exception("sentinel: parameter roles could not be read; rows are sent as 'matrix' or 'vector'")
        return tuple(_shape_role(p) for p in params)
