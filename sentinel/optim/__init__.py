"""Stabilising optimizer transforms, composed around the user's own optimizer (chain.py).

guard.py  in-step guard: skip or clip outlier and non-finite updates
wesar.py  WeSaR reparameterisation W̄ = α·W (papers/001)
eps.py    Adam-ε auto-tuning (papers/003 §3.4)
clamp.py  per-role update-ratio clamp
fused.py  the Adam/AdamW update made by sentinel with all of them folded in (optim.fused: auto)
All are off unless the config turns them on; the guard is always present to carry out
requested skips (``sn.skip_updates``, the agent's skip_update command).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor

import sentinel.optim.sharded as sharded
from sentinel.config import Config
from sentinel.optim.base import StepContext, Transform, optimizer_params
from sentinel.optim.chain import Chain
from sentinel.optim.clamp import Clamp
from sentinel.optim.eps import EpsTune
from sentinel.optim.fused import FusedStep, refusal
from sentinel.optim.guard import Guard
from sentinel.optim.wesar import WeSaR

log = logging.getLogger("sentinel")

__all__ = [
    "Chain",
    "Clamp",
    "EpsTune",
    "FusedStep",
    "Guard",
    "StepContext",
    "Transform",
    "WeSaR",
    "build",
    "fused_step",
    "optimizer_params",
]


def build(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    params: list[Tensor],
    group_of: list[int],
    names: tuple[str, ...],
    role_map: Any = None,
) -> dict[str, Transform]:
    """The transforms the config turns on, constructed in dependency order (WeSaR adds a param group).

    ``role_map``: the model's :class:`sentinel.roles.RoleMap` when the caller has one (else made here).
    """
    cfg = config.optim
    cfg = _refuse_unsharded_sums(cfg, params)
    g = cfg.guard
    transforms: dict[str, Transform] = {
        "guard": Guard(action=g.action, z=g.z, alpha=g.alpha, warmup=g.warmup, detect=g.enabled)
    }
    roles: dict[str, str] = {}
    if cfg.wesar.enabled or cfg.clamp.enabled:
        from sentinel.roles import assign_roles

        if role_map is None:
            role_map = assign_roles(model, config.roles.preset, config.roles.overrides)
        for name in names:
            r = role_map.get(name)
            if r is not None:
                roles[name] = r.role
    if cfg.wesar.enabled:
        w = cfg.wesar
        dims = {k: getattr(w, k) or getattr(role_map, k) for k in ("d_model", "d_ffn", "n_layers")}
        missing = [k for k, v in dims.items() if not v]
        if missing:
            raise ValueError(f"WeSaR needs {', '.join('optim.wesar.' + k for k in missing)}: not inferable from roles")
        transforms["wesar"] = WeSaR(
            optimizer,
            params,
            names,
            roles,
            d=dims["d_model"],
            d_ffn=dims["d_ffn"],
            n_layers=dims["n_layers"],
            init=w.init,
            sigma2=w.sigma2,
            gate_lr_scale=w.gate_lr_scale,
            gate_weight_decay=w.gate_weight_decay,
            model=model,
        )
    if cfg.eps.enabled:
        e = cfg.eps
        transforms["eps"] = EpsTune(
            optimizer, params, group_of, ratio=e.ratio, floor=e.floor, every=e.every, per_decade=e.per_decade
        )
    if cfg.clamp.enabled:
        c = cfg.clamp
        transforms["clamp"] = Clamp(
            optimizer,
            params,
            group_of,
            names,
            roles,
            max_ratio=dict(c.max_ratio),
            default=c.default,
            chunk_elements=config.stats.chunk_elements,
        )
    if "wesar" in transforms and "clamp" in transforms:
        transforms["clamp"].alpha_of = transforms["wesar"].alpha_by_index  # sharded: ‖W̄‖ summed, ‖W‖ = ‖W̄‖/α
    return transforms


def _refuse_unsharded_sums(cfg: Any, params: list[Tensor]) -> Any:
    """Turn off, with one WARNING and the fix, the transforms whose sums cannot be whole-tensor sums here.

    Sharded (DTensor) parameters need one reduction over all of them (sentinel/optim/sharded.py);
    parameters on several device meshes or with Partial placements have none, and a transform
    acting on shard-local norms would be silently wrong (each rank its own decision).
    """
    on = [k for k in ("guard", "wesar", "eps", "clamp") if getattr(cfg, k).enabled]
    if not on:
        return cfg
    reason = sharded.refusal(params)
    if reason is None:
        return cfg
    log.warning(
        "sentinel: %s turned OFF: under sharding they need whole-tensor sums over every parameter, which cannot be "
        "formed here (%s); fix: shard every parameter on one device mesh without Partial placements "
        "(fully_shard and parallelize_module over one mesh), or attach sentinel to one mesh's parameters",
        ", ".join("optim." + k for k in on),
        reason,
    )
    off = {k: dataclasses.replace(getattr(cfg, k), enabled=False) for k in on}
    return dataclasses.replace(cfg, **off)


def fused_step(
    optimizer: torch.optim.Optimizer,
    config: Config,
    params: list[Tensor],
    group_of: list[int],
    transforms: dict[str, Transform],
) -> FusedStep | None:
    """The fused update when ``optim.fused`` is 'auto' and it can run (else None, with the reason logged)."""
    if config.optim.fused != "auto" or not {"wesar", "eps", "clamp"} & set(transforms):
        return None
    stats = transforms.get("stats")
    reason = refusal(optimizer, stats.stats.mode if stats is not None else None)
    if reason is not None:
        log.warning("sentinel: optim.fused 'auto': the transforms act around the optimizer's step: %s", reason)
        return None
    wesar = transforms.get("wesar")
    if wesar is not None:
        wesar.fused = True
    clamp = transforms.get("clamp")
    for t in (clamp, stats):
        if t is not None and wesar is not None:
            t.units_of = wesar.alpha_by_index
            t.units_after_of = wesar.new_alpha_by_index
    log.info(
        "sentinel: one fused Adam step carries %s", ", ".join(n for n in ("wesar", "eps", "clamp") if n in transforms)
    )
    return FusedStep(optimizer, params, group_of)
