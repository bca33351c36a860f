"""Forward probes: per-layer activation statistics measured during sampled training steps.

Hooks exist only while a step is sampled (``step % probes.every == 0``): :meth:`Probes.begin_step`
registers them before the step's forward and :meth:`Probes.collect` removes them, so an
unsampled step runs the model untouched.  Within a sampled step each hook measures the first
forward that runs with gradients enabled (the first micro-batch; eval passes under
``torch.no_grad`` and activation-checkpoint recomputations are not measured twice).  Every
value stays on the device; :meth:`collect` packs them into one tensor per group of rows
that share their statistics, which the caller publishes as its own message.

Groups (rows are module names; statistics listed in docs/probes.md):

* ``linear``: ``out_rms``, ``out_l2`` of each QKV, Proj, FC1, FC2 output (Rybakov et al.,
  papers/004: these grow > 2x before divergence);
* ``attention``: ``attn_logit_max`` and the top-k heads' maxima (Wortsman et al., papers/003);
* ``block``: ``resid_std`` of the block input, and Takase's bounds (papers/000, eq. 15, 20);
* ``embedding``: ``embed_std`` of the embedding output (Takase §4: keep it near 1);
* ``norm``: ``norm_in_std`` of each normalisation input (small inputs amplify gradients);
* ``head``: ``log_z_mean``, ``log_z_max`` of the output logits (papers/003 §3.1.2, z-loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import _get_current_function_mode_stack

from sentinel.probes.attention import AttentionCapture, positions, te_head_max
from sentinel.probes.bounds import attention_bound, ffn_bound, jz_estimate, weight_std
from sentinel.probes.plan import ProbePlan, make_plan
from sentinel.roles import RoleMap
from sentinel_contract.protocol import Layout

log = logging.getLogger("sentinel")

__all__ = ["GROUP_STATS", "Probes", "top_head_stats"]

GROUP_STATS: dict[str, tuple[str, ...]] = {
    "linear": ("out_rms", "out_l2"),
    "attention": ("attn_logit_max",),
    "block": ("resid_std",),
    "embedding": ("embed_std",),
    "norm": ("norm_in_std",),
    "head": ("log_z_mean", "log_z_max"),
}
BOUND_STATS = ("ffn_grad_bound", "attn_grad_bound")
#: scalars sent with the head group: agent/predict.py's log-Z predictor reads scalar log_z_mean
HEAD_SCALARS = ("log_z_mean",)


def top_head_stats(k: int) -> tuple[str, ...]:
    """``attn_logit_top1, attn_logit_top1_head, ...``: the k largest per-head maxima and their heads."""
    return tuple(s for i in range(1, k + 1) for s in (f"attn_logit_top{i}", f"attn_logit_top{i}_head"))


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return getattr(x, "last_hidden_state", None) if not isinstance(x, (str, bytes)) else None


def _input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    t = _first_tensor(args)
    if t is None:
        t = kwargs.get("hidden_states", kwargs.get("input", kwargs.get("inp")))
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None


def _std(x: torch.Tensor) -> torch.Tensor:
    return torch.std(x.detach().float(), correction=0)


class Probes:
    """Forward hooks on ``model`` from its role map; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        roles: RoleMap,
        *,
        every: int = 10,
        sample: int = 64,
        top_heads: int = 4,
        bounds: bool = True,
    ):
        self.model = model
        self.every, self.sample = every, sample
        self.plan: ProbePlan = make_plan(model, roles)
        self.modules = dict(model.named_modules())
        self.top_heads = top_heads
        self.bounds = bounds and self._bounds_possible()
        self.stats = dict(GROUP_STATS)
        self.stats["attention"] = GROUP_STATS["attention"] + top_head_stats(top_heads)
        if self.bounds:
            self.stats["block"] = GROUP_STATS["block"] + BOUND_STATS
        self.values: dict[tuple[str, str], Any] = {}
        self.armed_step: int | None = None
        self.errors = 0
        self._handles: list[Any] = []
        self._captures: dict[str, AttentionCapture] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._warned: set[str] = set()
        for note in self.plan.notes:
            log.info("sentinel probes: %s", note)

    @classmethod
    def start(cls, model: torch.nn.Module, config: Any, roles: RoleMap | None) -> Probes | None:
        """The probes of ``config`` (the ``probes`` section), armed for step 0; None (logged) when they cannot be."""
        if roles is None:
            log.error("sentinel: forward probes need the role map, which could not be built; no probes")
            return None
        try:
            c = config
            probes = cls(model, roles, every=c.every, sample=c.sample, top_heads=c.top_heads, bounds=c.bounds)
        except Exception:
            log.exception("sentinel: forward probes could not be set up; training continues without them")
            return None
        p = probes.plan
        log.info(
            "sentinel: forward probes every %d step(s): %d linears, %d attention, %d blocks, %d norms",
            c.every, len(p.linears), len(p.attentions), len(p.blocks), len(p.norms),
        )  # fmt: skip
        probes.begin_step(0)
        return probes

    def _bounds_possible(self) -> bool:
        p = self.plan
        why = None
        if not p.blocks:
            why = "no transformer blocks found"
        elif not (p.d_model and p.d_ffn and p.n_heads):
            why = f"d={p.d_model}, d_ffn={p.d_ffn}, heads={p.n_heads} not all known"
        else:
            bad = [
                b.name
                for b in p.blocks.values()
                if not (b.attention and b.ffn_input and b.qkv and b.o and b.fc1 and b.fc2)
            ]
            if bad:
                why = f"blocks without attention, MLP or pre-FFN norm: {', '.join(bad[:3])}"
        if why:
            log.info("sentinel probes: Takase bounds off (%s)", why)
        return why is None

    # -- arming ------------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def begin_step(self, step: int) -> None:
        """Register the hooks when ``step`` is sampled (called before the step's forward)."""
        if step % self.every != 0 or self.armed:
            return
        try:
            self._arm()
            self.armed_step = step
        except Exception:
            self.errors += 1
            log.exception("sentinel probes: could not register hooks at step %d; probes off", step)
            self._disarm()
            self.every = 1 << 62

    def _arm(self) -> None:
        p, m, h = self.plan, self.modules, self._handles
        for name in p.linears:
            h.append(m[name].register_forward_hook(self._guard(name, self._on_linear)))
        for name in p.embeddings:
            h.append(m[name].register_forward_hook(self._guard(name, self._on_embedding)))
        for name in p.heads:
            h.append(m[name].register_forward_hook(self._guard(name, self._on_head)))
        for name in p.norms:
            h.append(m[name].register_forward_pre_hook(self._guard(name, self._on_norm, pre=True), with_kwargs=True))
        for b in p.blocks.values():
            h.append(
                m[b.name].register_forward_pre_hook(self._guard(b.name, self._on_block, pre=True), with_kwargs=True)
            )
            if self.bounds and b.ffn_input not in p.norms:
                h.append(
                    m[b.ffn_input].register_forward_pre_hook(
                        self._guard(b.ffn_input, self._on_ffn_input, pre=True), with_kwargs=True
                    )
                )
        for name in p.attentions:
            te = [c for c in m[name].modules() if type(c).__name__ == "DotProductAttention"]
            if te:
                h.append(
                    te[0].register_forward_pre_hook(
                        self._guard(name, self._on_te, pre=True, kind="attn"), with_kwargs=True
                    )
                )
            else:
                h.append(m[name].register_forward_pre_hook(self._attn_enter(name)))
                h.append(m[name].register_forward_hook(self._attn_exit(name), always_call=True))

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        stack = _get_current_function_mode_stack()
        for cap in self._captures.values():  # a forward that raised leaves its mode entered
            if stack and stack[-1] is cap:
                cap.__exit__(None, None, None)
                stack = _get_current_function_mode_stack()
        self._captures.clear()

    def close(self) -> None:
        self._disarm()
        self.values.clear()

    # -- hooks -------------------------------------------------------------------------------

    def _guard(self, name: str, fn: Callable, pre: bool = False, kind: str | None = None) -> Callable:
        """Run ``fn`` once per sampled step, with gradients enabled only; never raise."""
        key = (kind or fn.__name__, name)

        def hook(module, args, *rest):
            if key in self.values or not torch.is_grad_enabled():
                return None
            try:
                with torch.no_grad():
                    value = fn(module, args, rest[0] if pre else rest[-1])
                if value is not None:
                    self.values[key] = value
            except Exception:
                self._error(name, "probe failed")
            return None

        return hook

    def _error(self, name: str, what: str) -> None:
        self.errors += 1
        if name not in self._warned:
            self._warned.add(name)
            log.exception("sentinel probes: %s on %s (training continues)", what, name)

    def _on_linear(self, module, args, output):
        y = _first_tensor(output)
        if y is None or not y.is_floating_point() or y.numel() == 0:
            return None
        l2 = torch.linalg.vector_norm(y.detach(), dtype=torch.float32)
        return torch.stack([l2 / math.sqrt(y.numel()), l2])

    def _on_embedding(self, module, args, output):
        y = _first_tensor(output)
        return None if y is None or not y.is_floating_point() else _std(y)

    def _on_norm(self, module, args, kwargs):
        x = _input(args, kwargs)
        return None if x is None else _std(x)

    _on_block = _on_norm
    _on_ffn_input = _on_norm

    def _on_head(self, module, args, output):
        y = _first_tensor(output)
        if y is None or not y.is_floating_point():
            return None
        y = y.detach()
        if y.dim() >= 3:
            y = y.index_select(-2, positions(y.shape[-2], self.sample, y.device))
        lz = torch.logsumexp(y.float(), dim=-1)
        return torch.stack([lz.mean(), lz.max()])

    def _on_te(self, module, args, kwargs):
        out = te_head_max(module, args, kwargs, self.sample)
        if out is None:
            name = next(n for n, mod in self.modules.items() if mod is module)
            if name not in self._warned:
                self._warned.add(name)
                log.warning("sentinel probes: %s: qkv_format not supported for the logit probe (sbhd, bshd)", name)
        return out

    def _attn_enter(self, name: str) -> Callable:
        def hook(module, args):
            if ("attn", name) in self.values or name in self._captures or not torch.is_grad_enabled():
                return None
            cap = AttentionCapture(self.sample)
            cap.__enter__()
            self._captures[name] = cap
            return None

        return hook

    def _attn_exit(self, name: str) -> Callable:
        def hook(module, args, output):
            cap = self._captures.pop(name, None)
            if cap is None:
                return None
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is cap:
                cap.__exit__(None, None, None)
            if cap.error is not None:
                self.errors += 1
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("sentinel probes: attention logit probe failed on %s: %r", name, cap.error)
            elif cap.result is not None:
                self.values[("attn", name)] = (cap.result, cap.seq_len)
            elif name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "sentinel probes: %s made no scaled_dot_product_attention or softmax call the logit probe "
                    "recognises; no attn_logit_max for it",
                    name,
                )
            return None

        return hook

    # -- collection --------------------------------------------------------------------------

    def collect(self) -> list[tuple[Layout, torch.Tensor]]:
        """Remove the hooks and return ``(layout, packed values)`` per group measured this step."""
        if not self.armed and not self.values:
            return []
        self._disarm()
        values, self.values = self.values, {}
        try:
            return self._pack(values)
        except Exception:
            self._error("collect", "packing probe statistics failed")
            return []

    def _layout(self, group: str, scalars: tuple[str, ...], stats: tuple[str, ...], rows: tuple[str, ...]) -> Layout:
        key = (scalars, stats, rows)
        lay = self._layouts.get(key)
        if lay is None:
            roles = self.plan.row_roles(group, rows)
            lay = self._layouts[key] = Layout(scalars=scalars, stats=stats, tensors=rows, roles=roles)
        return lay

    def _group(self, name: str, rows: list[str], vectors: list[torch.Tensor], scalars=()) -> tuple | None:
        if not rows:
            return None
        matrix = torch.stack([v.reshape(-1).float() for v in vectors])
        parts = [torch.stack([s.reshape(()).float() for s in scalars])] if scalars else []
        names = HEAD_SCALARS if scalars else ()
        return self._layout(name, names, self.stats[name], tuple(rows)), torch.cat([*parts, matrix.reshape(-1)])

    def _pack(self, values: dict) -> list[tuple[Layout, torch.Tensor]]:
        p = self.plan
        out = []

        def simple(group: str, kind: str, names: list[str]) -> None:
            rows = [n for n in names if (kind, n) in values]
            g = self._group(group, rows, [values[(kind, n)] for n in rows])
            if g:
                out.append(g)

        simple("linear", "_on_linear", list(p.linears))
        rows, vecs = [], []
        for name in p.attentions:
            v = values.get(("attn", name))
            if v is None:
                continue
            per_head = v[0]
            row = [per_head.max()]
            if self.top_heads:
                k = min(self.top_heads, per_head.numel())
                top = torch.topk(per_head, k)
                vals, idx = top.values, top.indices.float()
                if k < self.top_heads:  # fewer heads than asked: repeat the smallest
                    pad = self.top_heads - k
                    vals = torch.cat([vals, vals[-1:].expand(pad)])
                    idx = torch.cat([idx, idx[-1:].expand(pad)])
                row.append(torch.stack([vals, idx], dim=1).reshape(-1))
            rows.append(name)
            vecs.append(torch.cat([r.reshape(-1) for r in row]))
        g = self._group("attention", rows, vecs)
        if g:
            out.append(g)
        rows, vecs = [], []
        for b in p.blocks.values():
            sx = values.get(("_on_norm", b.name))
            if sx is not None:
                rows.append(b.name)
                vecs.append([sx, *(self._bounds(b, sx, values) if self.bounds else [])])
        if rows:
            complete = self.bounds and all(len(v) == 3 for v in vecs)  # a bound needs its block's attention row
            stats = self.stats["block"] if complete else GROUP_STATS["block"]
            matrix = torch.stack([torch.stack(v if complete else v[:1]) for v in vecs])
            out.append((self._layout("block", (), stats, tuple(rows)), matrix.reshape(-1)))
        simple("embedding", "_on_embedding", p.embeddings)
        simple("norm", "_on_norm", p.norms)
        rows = [n for n in p.heads if ("_on_head", n) in values]
        if rows:
            first = values[("_on_head", rows[0])]
            g = self._group("head", rows, [values[("_on_head", n)] for n in rows], scalars=(first[0],))
            out.append(g)
        return out

    def _bounds(self, b, sx: torch.Tensor, values: dict) -> list[torch.Tensor]:
        p = self.plan
        sxp = values.get(("_on_norm", b.ffn_input))
        attn = values.get(("attn", b.attention))
        if sxp is None or attn is None:
            return []
        params = dict(self.model.named_parameters(remove_duplicate=False))
        s1 = weight_std([params[n] for n in b.fc1])
        s2 = weight_std([params[n] for n in b.fc2])
        so = weight_std([params[n] for n in b.o])
        sq = weight_std([params[n] for n in b.qkv])
        jz = jz_estimate(sq, p.d_model, p.n_heads, attn[1])
        return [ffn_bound(s1, s2, sxp, p.d_model, p.d_ffn), attention_bound(so, sx, p.d_model, jz)]
