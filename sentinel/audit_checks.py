"""The audit's numeric checks: Takase's two conditions and per-layer bound, WeSaR's norm
uniformity, and Adam's ε against the gradient RMS, all at initialisation.

They need real weights and one forward/backward pass on a few random tokens (``sentinel audit
--no-meta``); on the meta device they say so and pass.  Conditions (papers/000 §4):

1. *small sub-layers*: W_o and W_down are initialised smaller than the other matrices by about
   1/√(2N).  Checked as σ(W_down), σ(W_o) ≤ 2 · σ_small/√(2N) with σ_small = √(2/(5d)), the
   widely used initialisation the paper starts from.
2. *large shortcut*: the standard deviation of the embedding output, the shortcut the first
   layer sees, is near 1.  Checked as ≥ ``MIN_SHORTCUT_STD`` = 0.3: Scaled Embed gives √(2/5) ≈
   0.63 at σ_small, Embed LN gives 1, Vanilla gives σ_small ≈ 0.013 at d = 2304.

The per-layer bounds are eq. 15 and eq. 20 (sentinel/probes/bounds.py) with σx, σx′ measured
at each layer's two normalisation inputs; the attention bound uses the paper's ‖J_Z‖ estimate
(Appendix I), a scale indicator.  Fig. 2's reading: a bound that is large in shallow layers
means the shortcut is too small there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sentinel.audit import AuditContext, Section, _table
from sentinel.model_call import ModelCallError, forward_loss
from sentinel.probes.bounds import attention_bound, ffn_bound, jz_estimate

MIN_SHORTCUT_STD = 0.3
SMALL_SUBLAYER_SLACK = 2.0
EPS_MARGIN = 10.0
NUMERIC_SECTIONS = ("takase", "wesar", "eps")


def _on_meta(ctx: AuditContext) -> bool:
    return any(p.is_meta for p in ctx.model.parameters())


def _std(tensors: list[torch.Tensor]) -> float:
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    return float(flat.std(unbiased=False))


def _meta_section(name: str) -> Section:
    return Section(name, "skipped", "needs real weights: run with --no-meta to measure", [])


def _norm_owners(ctx: AuditContext) -> dict[int, list[torch.nn.Module]]:
    """Per layer, the modules owning its normalisation gains, in model order (pre-attention, pre-FFN)."""
    owners: dict[str, torch.nn.Module] = {}
    for mname, module in ctx.model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = module
    out: dict[int, list[torch.nn.Module]] = {}
    for name, role in ctx.roles.items():
        if role.role == "norm" and role.layer is not None and name in owners:
            mods = out.setdefault(role.layer, [])
            if owners[name] not in mods:
                mods.append(owners[name])
    return out


def _tokens(ctx: AuditContext) -> torch.Tensor:
    emb = ctx.roles.names("embedding")
    rows = [m.num_embeddings for m in ctx.model.modules() if isinstance(m, torch.nn.Embedding)]
    vocab = dict(ctx.model.named_parameters())[emb[0]].shape[0] if emb else min([256, *rows])
    if ctx.input_shape is None:  # the shortest position table bounds the sequence
        n_pos = [m.num_embeddings for m in ctx.model.modules() if isinstance(m, torch.nn.Embedding)]
        ctx_len = min([ctx.tokens, *[r for r in n_pos if r < vocab]]) if n_pos else ctx.tokens
    else:
        ctx_len = ctx.input_shape[1]
    batch, n = ctx.input_shape or (1, ctx_len)
    if ctx.input_shape is None:
        for name in ctx.roles.names("pos_embedding"):
            n = min(n, dict(ctx.model.named_parameters())[name].shape[0])
    device = next(ctx.model.parameters()).device
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0)).to(device)


def _forward(ctx: AuditContext, backward: bool) -> dict[int, list[float]]:
    """One forward pass (and a backward one for the ε check, which doubles the memory); the std
    of every normalisation input per layer."""
    if ctx.measured is not None and not backward:
        return ctx.measured
    owners = _norm_owners(ctx)
    seen: dict[int, list[float]] = {layer: [] for layer in owners}
    hooks = []
    for layer, mods in owners.items():
        for m in mods[:2]:
            hooks.append(
                m.register_forward_pre_hook(
                    lambda _m, args, layer=layer: seen[layer].append(float(args[0].detach().float().std()))
                )
            )
    ids = _tokens(ctx)
    try:
        with torch.set_grad_enabled(backward):
            try:
                loss = forward_loss(ctx.model, ids, ctx.loss_hook)
                if backward:
                    loss.float().backward()
            except ModelCallError:
                raise
            except Exception as exc:
                raise ModelCallError(
                    f"one forward/backward on token ids of shape {tuple(ids.shape)} raised {type(exc).__name__}: {exc}"
                ) from exc
    finally:
        for h in hooks:
            h.remove()
    ctx.measured = seen
    return seen


def takase_section(ctx: AuditContext) -> Section:
    """Takase's conditions and per-layer bounds (eq. 15, 20) at initialisation."""
    if _on_meta(ctx):
        return _meta_section("takase")
    rm = ctx.roles
    d, d_ffn, n_layers, heads = rm.d_model, rm.d_ffn, rm.n_layers, rm.n_heads or 1
    if not (d and d_ffn and n_layers):
        return Section("takase", "warn", "the role map could not infer d, d_ffn and N: no bound computed", [])
    params = dict(ctx.model.named_parameters())
    by_layer: dict[int, dict[str, list[torch.Tensor]]] = {}
    for name, role in rm.items():
        if role.layer is not None and role.is_matrix:
            by_layer.setdefault(role.layer, {}).setdefault(role.role, []).append(params[name])
    measured = _forward(ctx, backward=False)
    seq = ctx.input_shape[1] if ctx.input_shape else ctx.tokens
    sigma_small = math.sqrt(2.0 / (5.0 * d))
    limit = SMALL_SUBLAYER_SLACK * sigma_small / math.sqrt(2.0 * n_layers)
    rows = [("layer", "σx", "σx′", "σ1", "σ2", "σO", "FFN bound (15)", "attn bound (20)")]
    ffn: list[float] = []
    big_sublayers: list[str] = []
    for layer in sorted(by_layer):
        w = by_layer[layer]
        stds = measured.get(layer, [])
        if len(stds) < 2 or not (w.get("up") or w.get("gate_up")) or not w.get("down") or not w.get("o"):
            continue
        sx, sx2 = stds[0], stds[1]
        s1 = _std(w.get("up", []) + w.get("gate", []) + w.get("gate_up", []))
        s2, so = _std(w["down"]), _std(w["o"])
        sqkv = _std(w.get("q", []) + w.get("k", []) + w.get("v", []) + w.get("qkv", []))
        b_ffn = float(ffn_bound(torch.tensor(s1), torch.tensor(s2), torch.tensor(sx2), d, d_ffn))
        jz = jz_estimate(torch.tensor(sqkv), d, heads, seq)
        b_attn = float(attention_bound(torch.tensor(so), torch.tensor(sx), d, jz))
        ffn.append(b_ffn)
        if s2 > limit or so > limit:
            big_sublayers.append(str(layer))
        rows.append(
            (
                str(layer),
                f"{sx:.3g}",
                f"{sx2:.3g}",
                f"{s1:.3g}",
                f"{s2:.3g}",
                f"{so:.3g}",
                f"{b_ffn:.3g}",
                f"{b_attn:.3g}",
            )
        )
    if not ffn:
        return Section("takase", "warn", "no layer with norm, up, down and o matrices found: no bound computed", [])
    shortcut = measured[min(measured)][0] if measured and measured[min(measured)] else float("nan")
    worst = max(range(len(ffn)), key=ffn.__getitem__)
    lines = [
        f"{len(ffn)} layers, d={d}, d_ffn={d_ffn}, {heads} heads, {seq} random tokens",
        f"condition 1, small sub-layers: σ(W_down), σ(W_o) <= {limit:.3g} (2·√(2/(5d))/√(2N)): "
        + ("ok" if not big_sublayers else f"FAILS in layers {', '.join(big_sublayers)}"),
        f"condition 2, large shortcut: embedding-output std {shortcut:.3g} >= {MIN_SHORTCUT_STD}: "
        + ("ok" if shortcut >= MIN_SHORTCUT_STD else "FAILS"),
        f"largest FFN bound {ffn[worst]:.3g} at layer {rows[worst + 1][0]}; first layer {ffn[0]:.3g}, "
        f"last {ffn[-1]:.3g}",
        "",
        *_table(rows),
    ]
    fixes = []
    if big_sublayers:
        fixes.append("scale W_o and W_down by 1/√(2N) at init (stabilise.init: scaled)")
    if not shortcut >= MIN_SHORTCUT_STD:
        fixes.append("Scaled Embed (stabilise.scaled_embed: true) or Embed LN (stabilise.embed_ln: true)")
    data = {
        "min_shortcut_std": MIN_SHORTCUT_STD,
        "embedding_std": shortcut,
        "sublayer_std_limit": limit,
        "large_sublayers": big_sublayers,
        "ffn_bound": ffn,
        "ffn_bound_max_layer": int(rows[worst + 1][0]),
    }
    if fixes:
        lines.append("fix: " + "; ".join(fixes))
        return Section("takase", "fail", f"condition(s) broken, FFN bound up to {ffn[worst]:.3g}", lines, data)
    return Section("takase", "ok", f"both conditions hold, FFN bound at most {ffn[worst]:.3g}", lines, data)


def wesar_section(ctx: AuditContext) -> Section:
    """WeSaR's premise: weight matrices of very different norms get very different update ratios
    (papers/001 §3.3); report the spread of the matrices' std."""
    if _on_meta(ctx):
        return _meta_section("wesar")
    params = dict(ctx.model.named_parameters())
    stds = {n: _std([params[n]]) for n, r in ctx.roles.items() if r.is_matrix and r.role not in ("norm", "bias")}
    stds = {n: s for n, s in stds.items() if s > 0}
    if not stds:
        return Section("wesar", "ok", "no weight matrix to compare", [])
    lo, hi = min(stds, key=stds.get), max(stds, key=stds.get)
    spread = stds[hi] / stds[lo]
    on = ctx.config.optim.wesar.enabled
    lines = [
        f"matrix std from {stds[lo]:.3g} ({lo}) to {stds[hi]:.3g} ({hi}): spread {spread:.3g}x",
        "WeSaR is on: the actual weights all get std √σ² and the spread moves into the gates"
        if on
        else "with Adam, a matrix k times smaller moves about k times more per step (update ratio)",
    ]
    status = "ok" if on or spread <= 10 else "warn"
    summary = f"std spread {spread:.3g}x across {len(stds)} matrices" + ("" if status == "ok" else "; consider WeSaR")
    if status == "warn":
        lines.append("fix: optim.wesar.enabled: true (docs/optim.md)")
    return Section("wesar", status, summary, lines, {"spread": spread, "min": stds[lo], "max": stds[hi]})


def eps_section(ctx: AuditContext) -> Section:
    """Adam's ε against the gradient RMS at init (Wortsman et al. §3.4): where the gradient RMS is
    within ``EPS_MARGIN``·ε, ε shrinks the update and that tensor learns slowly."""
    if _on_meta(ctx):
        return _meta_section("eps")
    _forward(ctx, backward=True)
    eps = ctx.adam_eps
    rms = {
        n: float(p.grad.detach().float().square().mean().sqrt())
        for n, p in ctx.model.named_parameters()
        if p.grad is not None and p.numel()
    }
    if not rms:
        return Section("eps", "warn", "no gradient reached the parameters", [])
    low = sorted((n for n, r in rms.items() if r < EPS_MARGIN * eps), key=rms.get)
    lo = min(rms, key=rms.get)
    lines = [f"Adam ε {eps:g}; smallest gradient RMS {rms[lo]:.3g} ({lo}), one batch of {ctx.tokens} tokens"]
    if low:
        lines.append(f"{len(low)} tensor(s) with gradient RMS below {EPS_MARGIN:g}·ε: " + ", ".join(low[:8]))
        lines.append("fix: optim.eps.enabled: true (ε follows RMS(√v̂), docs/optim.md) or a smaller Adam ε")
        return Section("eps", "warn", f"{len(low)} tensor(s) near ε", lines, {"near_eps": low})
    return Section("eps", "ok", f"every gradient RMS is above {EPS_MARGIN:g}·ε", lines, {"min_grad_rms": rms[lo]})


def register(sections: list[Any]) -> None:
    sections.extend([_unless_skipped(f) for f in (takase_section, wesar_section, eps_section)])


def _unless_skipped(check: Any) -> Any:
    name = check.__name__.removesuffix("_section")

    def run(ctx: AuditContext) -> Section:
        if name in ctx.skip:
            return Section(name, "skipped", "not run (--skip)", [])
        return check(ctx)

    run.__name__ = check.__name__
    return run
