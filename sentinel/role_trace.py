"""One traced forward pass: the dataflow between the model's weight matrices and its attention.

Why: names say what a matrix is only when they follow a convention the presets know; the
dataflow says it for any model.  :func:`trace` runs the real model once on a tiny input
(batch 1 x 8 tokens, under ``torch.no_grad`` in eval mode) inside a ``TorchFunctionMode``
that records every torch call as a node of a graph: which tensors went in, which came out,
which parameter (or view of one: ``W.t()``, ``W[e]``) was the weight of a matrix product
(``linear``, ``matmul``/``@``, ``addmm`` for Hugging Face's ``Conv1D``, ``bmm``, ``embedding``),
and where attention happened (``scaled_dot_product_attention``; a ``softmax`` whose input
comes from a product of two activations; a Transformer Engine ``DotProductAttention`` module).
Tensors are keyed by identity, views of a matrix output remember which of its output channels
they cover (how a fused QKV or gate/up matrix is split), and forward hooks keep the module
that made each call.  :mod:`sentinel.role_infer` reads the roles off the graph.

The pass never changes the model: gradients off, each module's ``training`` flag, the CPU and
CUDA RNG states and any KV cache (``use_cache=False`` where the forward takes it) are put back
or avoided; a failure is returned, never raised, and the role map falls back to the presets.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sentinel.model_call import call_model, example_ids, unwrap

__all__ = ["Attention", "Graph", "Node", "Use", "channels", "trace"]

T = torch.Tensor
MATRIX_FUNCS = {
    F.linear: "linear",
    torch.matmul: "matmul",
    T.matmul: "matmul",
    T.__matmul__: "matmul",
    T.__rmatmul__: "rmatmul",
    torch.mm: "matmul",
    T.mm: "matmul",
    torch.bmm: "matmul",
    T.bmm: "matmul",
    torch.addmm: "addmm",
    T.addmm: "addmm",
    torch.baddbmm: "addmm",
    T.baddbmm: "addmm",
    torch.einsum: "einsum",
    F.embedding: "embedding",
    F.conv1d: "conv",
}
#: MoE experts' grouped products (transformers 5); their meta kernel takes bf16 only, so the trace shapes them
_GROUPED = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
MATRIX_FUNCS.update(dict.fromkeys(_GROUPED, "matmul"))
SOFTMAX = {F.softmax, torch.softmax, T.softmax}
SDPA = F.scaled_dot_product_attention
ACTIVATIONS = {
    F.silu, F.gelu, F.relu, F.mish, F.softplus, F.leaky_relu, F.elu, F.selu, F.hardswish, F.glu, F.relu6,
    torch.sigmoid, T.sigmoid, torch.tanh, T.tanh, torch.relu, T.relu, torch.erf, T.erf, F.sigmoid, F.tanh,
}  # fmt: skip
MULS = {torch.mul, T.mul, T.__mul__, T.__rmul__}
TOPK = {torch.topk, T.topk}
NORMS = {F.layer_norm, F.rms_norm, F.group_norm, torch.rsqrt, T.rsqrt, F.normalize}
_TRANSPOSE_GETTERS = {"T", "mT", "H", "mH"}
_SAME_DIMS = {"to", "float", "half", "bfloat16", "type", "contiguous", "clone", "detach", "type_as"}
ATTENTION_MODULES = ("DotProductAttention",)  # Transformer Engine
#: a row gather of a weight (W[ids], W.index_select(0, ids)): an embedding lookup without nn.Embedding
_GATHERS = {T.__getitem__, torch.index_select, T.index_select}
#: reads of a value a meta tensor does not have: the trace answers them (mask fast paths, sizes)
_READS = {T.item, T.__bool__, T.tolist, T.__int__, T.__float__, T.__index__}


def _meta_value(func: Any, t: torch.Tensor) -> Any:
    """A stand-in for a meta tensor's value: True for booleans, 1 for integers, 0.0 otherwise.
    Only the control flow of the traced pass can depend on it, never a role."""
    value: Any = True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 0.0
    if func is T.tolist:
        return torch.full(t.shape, value).tolist() if t.dim() else value
    if func is T.__float__:
        return float(value)
    if func in (T.__int__, T.__index__):
        return int(value)
    return bool(value) if func is T.__bool__ else value


@dataclass
class Use:
    """One use of a weight matrix as the weight of a product."""

    node: int
    param: str  # canonical parameter name
    kind: str  # linear, matmul, rmatmul, addmm, einsum, embedding, conv
    out_dim: int | None  # the parameter's dimension that maps to the output features
    module: str  # innermost module running
    index_kind: str | None = None  # embedding: what the indices derive from (input ids, const)


@dataclass
class Attention:
    node: int
    kind: str  # sdpa, softmax, module
    q: int
    k: int
    v: int | None
    out: int | None
    module: str
    heads: int | None
    kv_heads: int | None


@dataclass
class Node:
    func: Any
    name: str
    inputs: list[int]
    outputs: list[int]
    module: str
    use: Use | None = None
    weights: list[tuple[str, int]] = field(default_factory=list)  # (param, input position) of weight-derived inputs


@dataclass
class Graph:
    """The recorded pass; value ids index ``kind`` ('input', 'act', 'weight', 'const')."""

    nodes: list[Node] = field(default_factory=list)
    kind: dict[int, str] = field(default_factory=dict)
    producer: dict[int, int] = field(default_factory=dict)
    consumers: dict[int, list[int]] = field(default_factory=dict)
    wsrc: dict[int, tuple[str, tuple[int | None, ...] | None]] = field(default_factory=dict)
    #: view of a matrix output -> (that output, shape, stride, offset, channels, elements): what it covers
    views: dict[int, tuple] = field(default_factory=dict)
    _channels: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    uses: list[Use] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    softmaxes: list[int] = field(default_factory=list)
    error: str | None = None
    tokens: tuple[int, ...] = ()
    output: int | None = None  # value id of the first output tensor


def channels(g: Graph, vid: int) -> frozenset[int]:
    """The output channels of its matrix product that view ``vid`` covers (computed when asked)."""
    got = g._channels.get(vid)
    if got is None:
        _, shape, stride, offset, width, numel = g.views[vid]
        idx = torch.arange(numel).as_strided(shape, stride, offset)
        covered = torch.zeros(width, dtype=torch.bool)
        covered[(idx % width).reshape(-1)] = True
        got = g._channels[vid] = frozenset(covered.nonzero().flatten().tolist())
    return got


def _flat(x: Any, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for item in x:
            _flat(item, out)
    elif isinstance(x, dict):
        for item in x.values():
            _flat(item, out)
    return out


def _name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return "get:" + owner.__name__
    return getattr(func, "__name__", str(func))


class _Recorder(TorchFunctionMode):
    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.g = Graph()
        self.params = params
        self.ids: dict[int, int] = {}
        self._refs: dict[int, Any] = {}
        self._roots: dict[int, tuple] = {}
        self._next = 0
        self.modules: list[str] = [""]
        self.in_te = 0
        self.failed: BaseException | None = None

    # -- values --------------------------------------------------------------------------------

    def _new(self, t: torch.Tensor, kind: str) -> int:
        vid = self._next
        self._next += 1
        key = id(t)
        self.ids[key] = vid
        self.g.kind[vid] = kind
        self.g.shapes[vid] = tuple(t.shape)

        def forget(_ref: Any, key: int = key, vid: int = vid, ids: dict = self.ids) -> None:
            if ids.get(key) == vid:
                del ids[key]

        with contextlib.suppress(TypeError):
            self._refs[vid] = weakref.ref(t, forget)
        return vid

    def value(self, t: torch.Tensor) -> int:
        key = id(t)
        if key in self.params:
            vid = self.ids.get(key)
            if vid is None or self.g.kind.get(vid) != "weight" or self.g.producer.get(vid) is not None:
                vid = self._new(t, "weight")
                self.g.wsrc[vid] = (self.params[key], tuple(range(t.dim())))
            return vid
        vid = self.ids.get(key)
        return self._new(t, "const") if vid is None else vid

    # -- recording -----------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return _meta_value(func, args[0])
        if func in _GROUPED and len(args) >= 2 and args[0].is_meta and args[1].dim() == 3:
            out = torch.empty(args[0].shape[0], args[1].shape[-1], dtype=args[0].dtype, device="meta")
        else:
            out = func(*args, **kwargs)
        if self.failed is None:
            try:
                self._record(func, args, kwargs, out)
            except Exception as exc:  # the model's own forward must never see the recorder fail
                self.failed = exc
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = _name(func)
        if name.startswith("get:") and name[4:] not in _TRANSPOSE_GETTERS and name[4:] != "data":
            return
        outs = _flat(out, [])
        if not outs:
            return
        tensors = _flat(list(args) + list(kwargs.values()), [])
        g = self.g
        inputs = [self.value(t) for t in tensors]
        kinds = raw = [g.kind[v] for v in inputs]
        if "weight" in kinds:  # integer indices into a weight (an expert's slice) keep it a weight
            kinds = [k if k == "weight" or t.is_floating_point() else "const" for k, t in zip(kinds, tensors)]
        weights = [(g.wsrc[v][0], i) for i, v in enumerate(inputs) if g.kind[v] == "weight" and v in g.wsrc]
        idx = len(g.nodes)
        node = Node(func, name, inputs, [], self.modules[-1], weights=weights)
        matrix = MATRIX_FUNCS.get(func)
        big = [i for i, v in enumerate(inputs) if g.kind[v] == "weight" and len(g.shapes[v]) >= 2 and v in g.wsrc]
        gather = self._row_gather(func, args, tensors, inputs, big)
        if gather is not None:
            matrix = "embedding"
        active = any(k in ("act", "input") for k in kinds)
        if matrix is not None and len(big) == 1 and (active or matrix == "embedding"):
            wpos = big[0]
            param, dims = g.wsrc[inputs[wpos]]
            node.use = Use(idx, param, matrix, self._out_dim(matrix, wpos, dims), self.modules[-1])
            if matrix == "embedding":
                node.use.index_kind = raw[gather] if gather is not None else raw[0] if wpos == 1 else None
            g.uses.append(node.use)
        if "act" in kinds or node.use is not None:
            okind = "act"
        elif "input" in kinds:
            okind = "input"
        elif "weight" in kinds:
            okind = "weight"
        else:
            okind = "const"
        for t in outs:
            vid = self._new(t, okind if okind != "act" or t.is_floating_point() or t.is_complex() else "const")
            g.producer[vid] = idx
            node.outputs.append(vid)
            if okind == "weight" and len(weights) == 1:
                g.wsrc[vid] = (weights[0][0], self._dims(name, args, tensors, t, inputs, weights[0][1]))
            elif okind == "act":
                self._channels(t, vid, node.use is not None)
        for v in inputs:
            g.consumers.setdefault(v, []).append(idx)
        g.nodes.append(node)
        if not self.in_te:
            if func is SDPA:
                self._sdpa(idx, args, kwargs, tensors, inputs, node.outputs)
            elif func in SOFTMAX and kinds and kinds[0] == "act":
                g.softmaxes.append(idx)

    def _row_gather(self, func: Any, args: tuple, tensors: list, inputs: list, big: list[int]) -> int | None:
        """``W[ids]`` or ``W.index_select(0, ids)`` on a whole 2-D weight: an embedding lookup written without
        ``nn.Embedding``; the position of the index tensor, or None.  (An integer *scalar* index into a 3-D
        weight is an expert's slice, which stays a weight.)"""
        if func not in _GATHERS or big != [0] or len(self.g.shapes[inputs[0]]) != 2:
            return None
        if self.g.wsrc[inputs[0]][1] != (0, 1):
            return None
        if func is not T.__getitem__ and (len(args) < 2 or args[1] != 0):  # index_select along dim 1: columns
            return None
        for i, t in enumerate(tensors[1:], 1):
            integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
            kind = self.g.kind[inputs[i]]
            if integer and t.dim() >= 1 and (kind == "input" or (kind == "const" and not self._from_act(inputs[i]))):
                return i
        return None

    def _from_act(self, vid: int, depth: int = 16) -> bool:
        """Whether a value was computed from activations (a router's expert indices), not from positions."""
        todo, seen = [vid], set()
        while todo and depth > 0:
            depth -= 1
            v = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            node = self.g.producer.get(v)
            if node is None:
                continue
            for u in self.g.nodes[node].inputs:
                if self.g.kind.get(u) == "act":
                    return True
                todo.append(u)
        return False

    def _out_dim(self, kind: str, wpos: int, dims: tuple[int | None, ...] | None) -> int | None:
        if dims is None or len(dims) < 2:
            return None
        if kind in ("linear", "conv"):
            return dims[0] if kind == "linear" else dims[0]
        if kind in ("matmul", "addmm"):
            last_operand = wpos == (2 if kind == "addmm" else 1)
            return dims[-1] if last_operand else dims[-2]
        if kind == "rmatmul":
            return dims[-1] if wpos == 0 else dims[-2]
        return None

    def _dims(self, name: str, args: tuple, tensors: list, out: torch.Tensor, inputs: list, pos: int):
        src = self.g.wsrc.get(inputs[pos])
        dims = src[1] if src else None
        if dims is None:
            return None
        base = tensors[pos]
        if name in ("t", "get:T", "get:mT", "get:H", "get:mH") and len(dims) >= 2:
            return (*dims[:-2], dims[-1], dims[-2])
        if name == "transpose" and len(args) >= 3:
            d = list(dims)
            a, b = args[1] % len(d), args[2] % len(d)
            d[a], d[b] = d[b], d[a]
            return tuple(d)
        if name == "permute":
            order = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
            return tuple(dims[int(o)] for o in order)
        if name == "__getitem__" and out.dim() == base.dim() - 1:
            i = args[1]
            if isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0):
                return dims[1:]
        if tuple(out.shape) == tuple(base.shape) and (
            name in _SAME_DIMS or name.startswith("__") or name == "get:data"
        ):
            return dims
        return tuple(out.shape) == tuple(base.shape) and dims or None

    def _channels(self, t: torch.Tensor, vid: int, use_output: bool) -> None:
        """For a view of a matrix product's output: which of that output's channels it covers."""
        root = t._base if t._base is not None else t
        if use_output:
            if t.is_contiguous() and t.numel() <= 1 << 20:
                self._roots[id(root)] = (weakref.ref(root), vid, t.storage_offset(), t.shape[-1], root.numel())
            return
        entry = self._roots.get(id(root))
        if entry is None or entry[0]() is not root or t._base is None:
            return
        _, bvid, offset, width, numel = entry
        self.g.views[vid] = (bvid, tuple(t.shape), tuple(t.stride()), t.storage_offset() - offset, width, numel)

    def _sdpa(self, idx: int, args: tuple, kwargs: dict, tensors: list, inputs: list, outs: list) -> None:
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        pos = {id(t): inputs[i] for i, t in enumerate(tensors)}
        self.g.attentions.append(
            Attention(
                idx, "sdpa", pos[id(q)], pos[id(k)], pos.get(id(v)), outs[0] if outs else None,
                self.modules[-1], q.shape[-3] if q.dim() >= 3 else None, k.shape[-3] if k.dim() >= 3 else None,
            )
        )  # fmt: skip

    # -- module hooks ------------------------------------------------------------------------

    def hooks(self, root: torch.nn.Module, prefix: str = "") -> list[Any]:
        handles = []
        for name, mod in root.named_modules(prefix=prefix):
            te = type(mod).__name__ in ATTENTION_MODULES
            handles.append(mod.register_forward_pre_hook(self._enter(name, te), with_kwargs=True))
            handles.append(mod.register_forward_hook(self._exit(name, te), with_kwargs=True, always_call=True))
        return handles

    def _enter(self, name: str, te: bool):
        def hook(module, args, kwargs):
            self.modules.append(name)
            if te:
                self.in_te += 1
                self._te_args = (args, kwargs)
            return None

        return hook

    def _exit(self, name: str, te: bool):
        def hook(module, args, kwargs, output):
            if self.modules[-1] == name and len(self.modules) > 1:
                self.modules.pop()
            if te:
                self.in_te -= 1
                try:
                    self._te(name, args, kwargs, output)
                except Exception as exc:
                    self.failed = self.failed or exc
            return None

        return hook

    def _te(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        names = ("query_layer", "key_layer", "value_layer")
        qkv = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        if not all(isinstance(t, torch.Tensor) and id(t) in self.ids for t in qkv[:2]):
            return
        outs = _flat(output, [])
        out = self.ids.get(id(outs[0])) if outs else None
        fmt = kwargs.get("qkv_format") or "sbhd"
        q, k = qkv[0], qkv[1]
        heads = q.shape[-2] if q.dim() == 4 and fmt in ("sbhd", "bshd") else None
        kv = k.shape[-2] if k.dim() == 4 and fmt in ("sbhd", "bshd") else None
        v = self.ids.get(id(qkv[2])) if isinstance(qkv[2], torch.Tensor) else None
        self.g.attentions.append(
            Attention(len(self.g.nodes) - 1, "module", self.ids[id(q)], self.ids[id(k)], v, out, name, heads, kv)
        )


def trace(model: torch.nn.Module, seq: int = 8) -> Graph:
    """Record one forward of ``model`` on ``seq`` tokens; ``Graph.error`` says why it could not."""
    root, why = unwrap(model)
    if root is None:
        return Graph(error=why)
    params = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        params.setdefault(id(p), name)
    rec = _Recorder(params)
    modes = {m: m.training for m in root.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    handles: list[Any] = []
    try:
        ids = example_ids(root, seq)
        rec.g.tokens = tuple(ids.shape)
        prefix = next((n for n, mod in model.named_modules() if mod is root), "")
        handles = rec.hooks(root, prefix)
        root.eval()
        with torch.no_grad():
            rec._new(ids, "input")
            with rec:
                out = call_model(root, ids)
        outs = _flat(out, [])
        if outs:
            rec.g.output = rec.ids.get(id(outs[0]))
        if rec.failed is not None:
            rec.g.error = f"recording failed: {type(rec.failed).__name__}: {rec.failed}"
    except Exception as exc:
        rec.g.error = f"forward on {seq} tokens raised {type(exc).__name__}: {exc}"
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return rec.g
