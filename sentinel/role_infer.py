"""Roles read off the traced dataflow (sentinel/role_trace.py), whatever the parameters are named.

Rules, in the order they are applied (each matrix keeps the first role it gets):

* **q, k, v, qkv**: the matrices whose outputs reach an attention's query, key and value
  without passing through another matrix (RoPE, QK-norm, views, ``split``/``chunk`` and head
  repeats in between are fine).  One matrix feeding all three is ``qkv``; the channels of its
  output that each part reads give the split sizes and the layout (``contiguous``, or
  ``interleaved`` with the number of groups, as GPT-NeoX and Megatron order them per head).
* **o**: the matrices the attention output reaches first.
* **embedding / pos_embedding**: ``embedding`` lookups indexed by the input token ids / by
  positions made inside the model.
* **down**: a matrix whose input comes only from matrices with no role yet; those are its
  **up** and **gate**: the one whose path goes through an activation and then multiplies the
  other is the gate; a single matrix whose halves take those two paths is ``gate_up``.
* **router**: a matrix whose output reaches a ``topk`` or scales an MLP's output (MoE).
* **head**: a matrix whose output reaches no other matrix and no attention.
* **norm** / **bias** vectors: weights of ``layer_norm``/``rms_norm`` or of the product with an
  ``rsqrt``-normalised activation; additive vectors of a matrix product.

Tied weights are one Parameter (one storage): each of its names gets the role of the use made
inside its own module (``wte`` embedding, ``lm_head`` head).  Layers are the order of the
attention calls (an MLP matrix belongs to the last attention before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sentinel.role_trace import ACTIVATIONS, MULS, NORMS, TOPK, Attention, Graph, channels

__all__ = ["AttentionSite", "Structure", "infer"]

_SCORES = ("matmul", "rmatmul", "einsum", "bmm", "baddbmm", "__matmul__", "__rmatmul__", "mm")
_ADDS = ("add", "__add__", "__radd__", "add_", "__iadd__")


@dataclass
class AttentionSite:
    """One attention found in the trace: its module and the matrices around it."""

    index: int
    kind: str
    module: str
    q: list[str]
    k: list[str]
    v: list[str]
    o: list[str]
    heads: int | None
    kv_heads: int | None


@dataclass
class Structure:
    """What the trace says: ``roles`` (canonical name -> role), per-name roles of tied aliases,
    fused splits, each matrix's output dimension and layer (attention order)."""

    roles: dict[str, str] = field(default_factory=dict)
    name_roles: dict[str, str] = field(default_factory=dict)
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dims: dict[str, int] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    attentions: list[AttentionSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    tokens: tuple[int, ...] = ()
    heads: int | None = None
    kv_heads: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Src:
    nodes: set[int] = field(default_factory=set)
    acts: set[bool] = field(default_factory=set)
    views: dict[bool, set[int]] = field(default_factory=dict)  # views of its output on the paths, by activation
    whole: set[bool] = field(default_factory=set)
    mixed: bool = False  # a path passed a product of two activations (an attention no rule recognised)

    def chans(self, g: Graph, act: bool | None = None) -> set[int]:
        out: set[int] = set()
        for a, views in self.views.items():
            if act is None or a == act:
                for v in views:
                    out |= channels(g, v)
        return out


def _sources(g: Graph, starts: list[int]) -> dict[str, _Src]:
    """Matrices whose outputs reach ``starts`` through no other matrix, with how (activation, channels)."""
    out: dict[str, _Src] = {}
    stack = [(v, False, None, False) for v in starts]
    seen: set = set()
    while stack:
        v, act, chan, mixed = stack.pop()
        if (v, act, chan, mixed) in seen or len(seen) > 200_000:
            continue
        seen.add((v, act, chan, mixed))
        if chan is None and v in g.views:
            chan = v
        p = g.producer.get(v)
        if p is None:
            continue
        node = g.nodes[p]
        if node.use is not None:
            src = out.setdefault(node.use.param, _Src())
            src.nodes.add(p)
            src.acts.add(act)
            src.mixed = src.mixed or mixed
            if chan is not None and g.views[chan][0] in node.outputs:
                src.views.setdefault(act, set()).add(chan)
            else:
                src.whole.add(act)
            continue
        a = act or node.func in ACTIVATIONS
        acts = [i for i in node.inputs if g.kind.get(i) == "act"]
        m = mixed or (node.name in _SCORES and len(acts) >= 2)  # a product of two activations: attention-like
        for i in acts:
            stack.append((i, a, chan, m))
    return out


def _walk_forward(g: Graph, start: list[int], limit: int = 400):
    """Nodes reachable from values ``start`` without crossing a matrix product (those are yielded, not crossed)."""
    seen: set[int] = set()
    todo = list(start)
    steps = 0
    while todo and steps < limit:
        v = todo.pop(0)
        for n in g.consumers.get(v, []):
            if n in seen:
                continue
            seen.add(n)
            steps += 1
            yield n
            if g.nodes[n].use is None:
                todo.extend(g.nodes[n].outputs)


def _data_inputs(g: Graph, node_idx: int) -> list[int]:
    return [i for i in g.nodes[node_idx].inputs if g.kind.get(i) == "act"]


def _softmax_attention(g: Graph, s_idx: int) -> Attention | None:
    node = g.nodes[s_idx]
    scores = None
    todo, depth = [node.inputs[0]], 0
    while todo and depth < 12 and scores is None:
        depth += 1
        v = todo.pop(0)
        p = g.producer.get(v)
        if p is None or g.nodes[p].use is not None:
            continue
        n = g.nodes[p]
        acts = _data_inputs(g, p)
        if n.name in _SCORES and len(acts) >= 2:
            scores = (p, acts)
        else:
            todo.extend(acts)
    if scores is None:
        return None
    q, k = scores[1][0], scores[1][1]
    weights = set(node.outputs)
    for n in _walk_forward(g, list(node.outputs), limit=40):
        nd = g.nodes[n]
        acts = _data_inputs(g, n)
        if nd.use is None and nd.name in _SCORES and len(acts) >= 2 and any(a in weights for a in acts):
            v = next((a for a in acts if a not in weights), None)
            shape = g.shapes.get(node.inputs[0], ())
            kshape = g.shapes.get(k, ())
            return Attention(
                s_idx, "softmax", q, k, v, nd.outputs[0] if nd.outputs else None, node.module,
                shape[-3] if len(shape) >= 3 else None, kshape[-3] if len(kshape) == 4 else None,
            )  # fmt: skip
        weights.update(nd.outputs)
    return None


def _split(g: Graph, src: dict[str, _Src], param: str) -> set[int] | None:
    s = src.get(param)
    if s is None or s.whole:
        return None
    return s.chans(g)


def _runs(chans: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(chans, chans[1:]) if b != a + 1)


def _qkv_fused(parts: dict[str, set[int] | None]) -> dict[str, Any] | None:
    if any(parts[p] is None for p in "qkv"):
        return None
    q, k, v = (sorted(parts[p]) for p in "qkv")
    if set(q) & set(k) or set(q) & set(v) or set(k) & set(v):
        return None
    contiguous = q == list(range(len(q))) and k == list(range(len(q), len(q) + len(k))) and v[0] == len(q) + len(k)
    contiguous = contiguous and v == list(range(v[0], v[0] + len(v)))
    layout = "contiguous" if contiguous else "interleaved"
    return {
        "names": ("q", "k", "v"),
        "sizes": (len(q), len(k), len(v)),
        "layout": layout,
        "groups": None if contiguous else _runs(q),
        "rule": "from the traced dataflow (the output channels q, k and v each read)",
    }


def infer(g: Graph, shapes: dict[str, tuple[int, ...]], aliases: dict[str, list[str]]) -> Structure:
    """The roles ``g`` shows, for parameters with ``shapes`` (canonical name -> shape, names -> all names)."""
    st = Structure(error=g.error, tokens=g.tokens)
    if g.error is not None:
        return st
    uses_of: dict[str, list] = {}
    for u in g.uses:
        uses_of.setdefault(u.param, []).append(u)
        if u.out_dim is not None:
            st.out_dims.setdefault(u.param, u.out_dim)
    role_of_use: dict[int, str] = {}

    def give(param: str, role: str, layer: int | None, nodes: Any = None) -> None:
        st.roles.setdefault(param, role)
        if layer is not None:
            st.layers.setdefault(param, layer)
        for n in nodes if nodes is not None else [u.node for u in uses_of.get(param, [])]:
            role_of_use.setdefault(n, role)

    # embeddings
    for u in g.uses:
        if u.kind == "embedding":
            role = "embedding" if u.index_kind == "input" else "pos_embedding"
            give(u.param, role, None, [u.node])
    # attention
    events = list(g.attentions)
    for s in g.softmaxes:
        att = _softmax_attention(g, s)
        if att is not None and all(att.q != e.q for e in events):
            events.append(att)
    events.sort(key=lambda a: a.node)
    attn_nodes: set[int] = set()
    for i, att in enumerate(events):
        attn_nodes.add(att.node)
        feeds: dict[str, set[str]] = {}
        srcs = {"q": _sources(g, [att.q]), "k": _sources(g, [att.k])}
        if att.v is not None:
            srcs["v"] = _sources(g, [att.v])
        for part, src in srcs.items():
            for param in src:
                if st.roles.get(param) not in ("embedding", "pos_embedding"):
                    feeds.setdefault(param, set()).add(part)
        site = AttentionSite(i, att.kind, att.module, [], [], [], [], att.heads, att.kv_heads)
        for param, parts in feeds.items():
            if parts == {"q", "k", "v"}:
                give(param, "qkv", i)
                fused = _qkv_fused({p: _split(g, srcs[p], param) for p in "qkv"})
                if fused is not None:
                    st.fused.setdefault(param, fused)
                site.q.append(param), site.k.append(param), site.v.append(param)
            elif len(parts) == 1:
                part = next(iter(parts))
                give(param, part, i)
                getattr(site, part).append(param)
            else:
                st.notes.append(f"{param} feeds {' and '.join(sorted(parts))} of one attention: no role for that")
        if att.out is not None:
            for n in _walk_forward(g, [att.out]):
                use = g.nodes[n].use
                if use is not None and use.kind != "embedding":
                    give(use.param, "o", i, [n])
                    site.o.append(use.param)
        st.attentions.append(site)

    def layer_at(node: int) -> int | None:
        before = [a.node for a in events if a.node <= node]
        return len(before) - 1 if before else (0 if events else None)

    # MLP: down and its up/gate
    for u in g.uses:
        if u.param in st.roles or u.kind == "embedding":
            continue
        src = _sources(g, _data_inputs(g, u.node))
        if not src or any(p in st.roles and st.roles[p] not in ("up", "gate", "gate_up") for p in src):
            continue
        if any(p == u.param for p in src) or not any(True in s.acts for s in src.values()):
            continue  # an MLP's hidden layer passes an activation
        if any(s.mixed for s in src.values()):
            continue  # tokens were mixed on the way: an attention the trace did not recognise, not an MLP
        layer = layer_at(u.node)
        give(u.param, "down", layer, [u.node])
        gated = {p for p, s in src.items() if True in s.acts}
        for p, s in src.items():
            if len(src) == 1:
                act_ch, plain_ch = s.chans(g, True), s.chans(g, False)
                if act_ch and plain_ch and not (act_ch & plain_ch) and not s.whole:
                    give(p, "gate_up", layer)
                    gate_first = min(act_ch) < min(plain_ch)
                    st.fused.setdefault(
                        p,
                        {
                            "names": ("gate", "up") if gate_first else ("up", "gate"),
                            "sizes": (len(act_ch), len(plain_ch)) if gate_first else (len(plain_ch), len(act_ch)),
                            "layout": "contiguous",
                            "groups": None,
                            "rule": "from the traced dataflow (the channels that pass the activation are the gate)",
                        },
                    )
                else:
                    give(p, "up", layer)
            elif len(gated) == 1 and p in gated:
                give(p, "gate", layer)
            else:
                give(p, "up", layer)
    # routers and heads
    for u in g.uses:
        if u.node in role_of_use or u.kind == "embedding":
            continue
        reached_use = reached_attn = routes = False
        for n in _walk_forward(g, g.nodes[u.node].outputs):
            nd = g.nodes[n]
            if nd.use is not None:
                reached_use = True
            if n in attn_nodes or nd.func in TOPK:
                reached_attn = reached_attn or n in attn_nodes
                routes = routes or nd.func in TOPK
            if nd.func in MULS:
                others = [i for i in _data_inputs(g, n) if i not in g.nodes[u.node].outputs]
                if any(st.roles.get(p) == "down" for i in others for p in _sources(g, [i])):
                    routes = True
            if routes:
                break
        if routes:
            give(u.param, "router", layer_at(u.node), [u.node])
        elif not reached_use and not reached_attn and u.kind != "embedding":
            give(u.param, "head", None, [u.node])
    _vectors(g, st, shapes)
    _tied(g, st, aliases, role_of_use)
    first = next((a for a in events if a.heads), None)
    if first is not None:
        st.heads, st.kv_heads = first.heads, first.kv_heads or first.heads
    return st


def _normalised(g: Graph, vid: int, depth: int = 5) -> bool:
    todo = [(vid, 0)]
    while todo:
        v, d = todo.pop()
        p = g.producer.get(v)
        if p is None or d > depth:
            continue
        node = g.nodes[p]
        if node.func in NORMS:
            return True
        if node.use is None:
            todo.extend((i, d + 1) for i in node.inputs if g.kind.get(i) == "act")
    return False


def _vectors(g: Graph, st: Structure, shapes: dict[str, tuple[int, ...]]) -> None:
    weights = {u.param for u in g.uses}
    for idx, node in enumerate(g.nodes):
        for param, _pos in node.weights:
            if param in st.roles:
                continue
            if len(shapes.get(param, (0, 0))) >= 2:  # stacked per-expert biases (GPT-OSS): never a product's weight
                if param not in weights and node.name in _ADDS and _adds_to_product(g, idx):
                    st.roles[param] = "bias"
                continue
            if node.func in NORMS:
                st.roles[param] = "norm"
            elif node.use is not None:
                st.roles[param] = "bias"
            elif node.func in MULS and any(_normalised(g, i) for i in _data_inputs(g, idx)):
                st.roles[param] = "norm"
            elif node.name in _ADDS and _adds_to_product(g, idx):
                st.roles[param] = "bias"


def _adds_to_product(g: Graph, idx: int) -> bool:
    acts = _data_inputs(g, idx)
    return any(g.producer.get(i) is not None and g.nodes[g.producer[i]].use is not None for i in acts)


def _tied(g: Graph, st: Structure, aliases: dict[str, list[str]], role_of_use: dict[int, str]) -> None:
    uses: dict[str, list] = {}
    for u in g.uses:
        uses.setdefault(u.param, []).append(u)
    for canon, names in aliases.items():
        if len(names) < 2 or canon not in uses:
            continue
        for name in names:
            owner = name.rpartition(".")[0]
            for u in uses[canon]:
                if u.node in role_of_use and (u.module == owner or owner.endswith("." + u.module) or u.module == ""):
                    st.name_roles.setdefault(name, role_of_use[u.node])
        own = st.name_roles.get(canon)
        if own is not None:
            st.roles[canon] = own
