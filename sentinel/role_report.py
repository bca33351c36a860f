"""What the role map could not find, said once and loudly, with the fix.

Why: a matrix without a role is left out of WeSaR's gates, the clamp's per-role limits and the
agent's role-aware predictors, and a block whose attention was not found has no attention-logit
probe (Wortsman et al., "Small-scale proxies for large-scale Transformer training
instabilities", arXiv:2309.14322: the max attention logit is the best-documented early sign of
divergence) and no Takase attention bound.  Losing that silently is the worst outcome, so
``attach`` logs :meth:`RoleGaps.text` as one WARNING, ``sentinel audit`` prints it and fails,
and every step message carries the two counts (``roles_unassigned_matrices``,
``roles_blocks_without_attention``) that the agent exports as gauges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sentinel.role_names import _layer_of
from sentinel.role_presets import MATRIX_ROLES
from sentinel.role_types import RoleMap

__all__ = ["RoleGaps", "find_gaps", "overrides_snippet"]

#: name hints for the snippet (a guess the user must check; the role map itself never guesses)
_HINTS = (
    (r"(?:^|_)(?:router|gating)(?:$|_)", "router"),
    (r"^(?:q|wq|query|q_proj)$", "q"),
    (r"^(?:k|wk|key|k_proj)$", "k"),
    (r"^(?:v|wv|value|v_proj)$", "v"),
    (r"qkv|query_key_value|in_proj|c_attn|wqkv", "qkv"),
    (r"^(?:o|wo|out_proj|o_proj|attn_out|proj|c_proj|dense)$", "o"),
    (r"^(?:w1|fc1|up|up_proj|c_fc|fc_in|dense_h_to_4h)$", "up"),
    (r"^(?:w3|gate|gate_proj)$", "gate"),
    (r"^(?:w2|fc2|down|down_proj|fc_out|dense_4h_to_h)$", "down"),
    (r"(?:^|_)(?:head|lm_head|unembed|output)(?:$|_)", "head"),
    (r"emb", "embedding"),
)


@dataclass
class RoleGaps:
    """Matrices without a role, blocks without a found attention, and what is off because of them."""

    unassigned: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    blocks_without_attention: list[str] = field(default_factory=list)
    features_off: list[str] = field(default_factory=list)
    trace_error: str | None = None

    @property
    def any(self) -> bool:
        return bool(self.unassigned or self.blocks_without_attention)

    def scalars(self) -> dict[str, float]:
        return {
            "roles_unassigned_matrices": float(len(self.unassigned)),
            "roles_blocks_without_attention": float(len(self.blocks_without_attention)),
        }

    def lines(self) -> list[str]:
        out = []
        if self.unassigned:
            out.append(f"{len(self.unassigned)} weight matrices without a role:")
            out += [f"  {n}  {'x'.join(map(str, s))}" for n, s in self.unassigned]
        if self.blocks_without_attention:
            out.append(f"{len(self.blocks_without_attention)} blocks where no attention was found:")
            out += [f"  {b}" for b in self.blocks_without_attention]
        if self.trace_error:
            out.append(f"the structural trace did not run: {self.trace_error}")
        if self.features_off:
            out.append("off because of it: " + "; ".join(self.features_off))
        if self.unassigned:
            out.append("fix: give them a role in the sentinel config (check each role; docs/roles.md):")
            out += ["  " + line for line in overrides_snippet([n for n, _ in self.unassigned]).splitlines()]
        elif self.blocks_without_attention:
            out.append(
                "fix: attention is found where scaled_dot_product_attention, a softmax over q·k, or Transformer "
                "Engine's DotProductAttention runs; an attention computed another way has no logit probe "
                "(docs/probes.md)"
            )
        return out

    def text(self) -> str:
        return "sentinel roles: " + "\n".join(self.lines())


def _pattern(name: str) -> str:
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _hint(name: str) -> str | None:
    parts = name.split(".")
    owner = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "w") else parts[-1]
    for regex, role in _HINTS:
        if re.search(regex, owner.lower()):
            return role
    return None


def overrides_snippet(names: list[str]) -> str:
    """A ``roles.overrides`` YAML block for ``names``, layer indices generalised to ``\\d+``; a role is
    filled in only from a name hint (marked to check), else ``REPLACE_ME``, which the config rejects."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(_pattern(name), name)
    lines = ["roles:", "  overrides:"]
    for pattern, name in seen.items():
        hint = _hint(name)
        role = hint or "REPLACE_ME"
        note = "  # from the name: check it" if hint else f"  # one of: {', '.join(MATRIX_ROLES)}"
        lines.append(f"    '{pattern}': {role}{note}")
    return "\n".join(lines)


def find_gaps(rm: RoleMap, config: Any = None, plan: Any = None) -> RoleGaps:
    """The gaps of role map ``rm`` (and of the probe plan, when given) under ``config`` (a sentinel Config)."""
    gaps = RoleGaps(unassigned=[(n, rm.shapes[n]) for n in rm.unassigned])
    st = rm.structure
    if st is not None and st.error is not None:
        gaps.trace_error = st.error
    layers = {r.layer for r in rm.values() if r.layer is not None and r.is_matrix}
    layers |= {_layer_of(n) for n in rm.unassigned} - {None}
    found: set[int] = set()
    names: dict[int, str] = {}
    if st is not None and st.error is None:
        found |= {rm[p].layer for a in st.attentions for p in (*a.q, *a.o) if p in rm}
    if plan is not None:
        for b in plan.blocks.values():
            layer = next((rm.get(p).layer for p in (*b.qkv, *b.o, *b.fc1, *b.fc2) if rm.get(p) is not None), None)
            if layer is not None:
                names[layer] = b.name
                if b.attention is not None:
                    found.add(layer)
                else:
                    found.discard(layer)
    elif st is None or st.error is not None:
        found |= {r.layer for r in rm.values() if r.role in ("q", "k", "qkv") and r.layer is not None}
    gaps.blocks_without_attention = [names.get(n, f"layer {n}") for n in sorted(layers - found)]
    off = []
    if gaps.unassigned:
        optim = getattr(config, "optim", None)
        if optim is not None and optim.wesar.enabled:
            off.append("WeSaR gates none of these matrices")
        if optim is not None and optim.clamp.enabled:
            off.append("the update-ratio clamp applies its default limit to them")
        off.append("the agent's role-aware predictors see them as plain 'matrix' rows")
        if config is None or config.probes.enabled:
            off.append("no out_rms/out_l2 probe on their outputs")
    if gaps.blocks_without_attention and (config is None or config.probes.enabled):
        off.append("no attn_logit_max (attention-logit probe) and no Takase attention bound for those blocks")
    gaps.features_off = off
    return gaps
