"""The few collectives sentinel needs: the control plane's, on a CPU (gloo) group, and the
statistics' one all-reduce over the shards of sharded (FSDP2, DTensor) parameters.

Why a separate group for the control plane: commands and checkpoint verdicts are tiny host-side values; moving them
through NCCL would force a device sync at every step boundary.  When the default group already
has a CPU backend it is reused; otherwise one gloo group is created (a collective call, so
every rank creates it at ``attach``, in the same order).  Without an initialised process group
everything here is the single-process identity, at no cost.  Nothing is pickled: payloads are
JSON bytes in a uint8 tensor, length first.

Statistics of sharded parameters (:class:`ShardSum`): each rank holds a shard of every
parameter, its gradient and its Adam state, so a norm over its local elements is partial, but
a *sum of squares* adds up across shards.  The per-tensor sums are packed into one small tensor
and all-reduced once on the parameters' own device-mesh group (NCCL on GPU); norms, ratios and
RMS are formed afterwards, equal to those of the unsharded tensors.  Replicated parameters (DDP,
or plain tensors) need no reduction at all: every rank already holds the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

_group: tuple[Any, Any] | None = None  # (default group it was made for, gloo group or None)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def cpu_group() -> Any:
    """The gloo group for sentinel's collectives (``None`` means the default group), cached."""
    global _group
    default = dist.group.WORLD
    if _group is None or _group[0] is not default:
        backend = str(dist.get_backend()).lower()
        _group = (default, None if "gloo" in backend else dist.new_group(backend="gloo"))
    return _group[1]


def new_cpu_group() -> Any:
    """A fresh gloo group (for work on another thread, such as an asynchronous checkpoint)."""
    return dist.new_group(backend="gloo")


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Rank 0's ``payload`` on every rank: one int64 broadcast, then the bytes if there are any."""
    if not active():
        return payload or b""
    group = cpu_group()
    data = payload or b""
    length = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(length, src=0, group=group)
    n = int(length.item())
    if n == 0:
        return b""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank() == 0 else torch.empty(n, dtype=torch.uint8)
    dist.broadcast(buf, src=0, group=group)
    return buf.numpy().tobytes()


def all_min(values: list[int]) -> list[int]:
    """Element-wise minimum over ranks (a verdict every rank agrees on)."""
    return _reduce(values, dist.ReduceOp.MIN)


def all_max(values: list[int]) -> list[int]:
    return _reduce(values, dist.ReduceOp.MAX)


def _reduce(values: list[int], op: Any) -> list[int]:
    if not active() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=op, group=cpu_group())
    return [int(v) for v in t.tolist()]


def barrier() -> None:
    if active():
        dist.barrier(group=cpu_group())


def local(t: Tensor) -> Tensor:
    """The shard this rank holds of a DTensor; any other tensor unchanged."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _common_root(meshes: set) -> Any:
    """The one mesh all of ``meshes`` are (named sub-meshes of), or None."""
    if len(meshes) == 1:
        return next(iter(meshes))
    roots = {m._get_root_mesh() for m in meshes}
    if len(roots) != 1:
        return None
    root = roots.pop()
    names = root.mesh_dim_names or ()
    if not all(m.mesh_dim_names and set(m.mesh_dim_names) <= set(names) for m in meshes):
        return None  # a flattened or unnamed sub-mesh: its dimensions do not map onto the root's
    return root


def _root_dims(p: Any, root: Any) -> set[int]:
    """The dimensions of ``root`` that DTensor ``p`` is sharded on."""
    mesh = p.device_mesh
    if mesh == root:  # an equal mesh (fully_shard makes one per call) counts as the same
        return {d for d, x in enumerate(p.placements) if _splits(x)}
    return {root.mesh_dim_names.index(mesh.mesh_dim_names[d]) for d, x in enumerate(p.placements) if _splits(x)}


def _splits(placement: Any) -> bool:
    """Whether a placement divides the tensor's elements between the ranks of its mesh dimension.

    ``Shard`` and also ``_StridedShard`` (FSDP2 over a tensor-parallel dimension 0), for which
    ``is_shard()`` is False in torch 2.13: neither replicated nor partial.
    """
    return not (placement.is_replicate() or placement.is_partial())


class ShardSum:
    """Adds per-tensor partial sums across the shards of DTensor parameters, in place.

    One ``all_reduce`` per mesh dimension the parameters are sharded on: one for FSDP2 and
    HSDP (sharded on one dimension, replicated on the other); FSDP2 with tensor parallelism,
    sharded on every dimension of a mesh of all ranks, is summed by one all-reduce on the
    default group.  A parameter replicated on a reduced dimension (or a plain tensor next to
    sharded ones) contributes from the ranks at coordinate 0 of that dimension only, so it is
    counted once.  Rows of the summed tensor are the parameters, in order.
    """

    def __init__(self, mesh: Any, dims: list[int], keep: list[bool]):
        self.mesh, self.dims = mesh, dims
        self.groups = [mesh.get_group(d) for d in dims]
        if len(dims) > 1 and len(dims) == mesh.ndim and mesh.size() == world_size():
            self.groups = [None]  # summed over every dimension of a mesh of all ranks: one all-reduce, on the world
        self.keep = None if all(keep) else torch.tensor(keep, dtype=torch.float64)
        self._failed: Tensor | None = None  # ranks that failed, from the last reduction (host memory)
        self._done: Any = None  # CUDA event: that reduction's result has reached ``_failed``

    @classmethod
    def for_params(cls, params: Sequence[Tensor]) -> ShardSum | None:
        """The reduction ``params`` need, or ``None`` where no parameter is sharded (single process, DDP).

        Parameters may live on sub-meshes of one named root mesh (FSDP2 on ``mesh["dp"]`` next to
        tensor-parallel ones on the 2-D ``("dp", "tp")`` mesh): each placement is then read on the
        root mesh's dimension of the same name, and a dimension a parameter's mesh lacks is one it
        is replicated on.
        """
        if DTensor is None or not active():
            return None
        dtensors = [p for p in params if isinstance(p, DTensor)]
        meshes = {p.device_mesh for p in dtensors}
        if not meshes:
            return None
        root = _common_root(meshes)
        if root is None:
            raise ValueError(
                f"statistics over parameters on {len(meshes)} different device meshes are not supported; "
                "attach sentinel to the parameters of one mesh (or of sub-meshes of one named mesh) "
                "or set stats.enabled: false"
            )
        partial = [
            i for i, p in enumerate(params) if isinstance(p, DTensor) and any(x.is_partial() for x in p.placements)
        ]
        if partial:
            raise ValueError(
                f"parameters with Partial placements (index {partial[:5]}) have no well-defined shard sums"
            )
        sharded_on = [_root_dims(p, root) if isinstance(p, DTensor) else set() for p in params]
        dims = sorted(set().union(*sharded_on))
        if not dims:
            return None
        coord = root.get_coordinate()
        if coord is None:
            raise ValueError("this rank holds parameters of a device mesh it is not part of")
        keep = [all(d in on or coord[d] == 0 for d in dims) for on in sharded_on]
        return cls(root, dims, keep)

    def __call__(self, sums: Tensor, failed: bool = False) -> Tensor:
        """``sums`` (parameters x columns, float64) summed over the shards: the statistics' one collective.

        One more element travels with the sums: the number of ranks whose statistics ``failed``
        this step, read back by :meth:`failures` at the next statistics step.
        """
        if self.keep is not None:
            if self.keep.device != sums.device:
                self.keep = self.keep.to(sums.device)  # once: a copy from the host would sync every step
            sums = sums * self.keep.to(sums.dtype).unsqueeze(1)
        flag = torch.full((1,), float(failed), dtype=sums.dtype, device=sums.device)  # a fill, not a copy
        packed = torch.cat([sums.flatten(), flag])
        for group in self.groups:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        if packed.device.type == "cuda":
            if self._failed is None or not self._failed.is_pinned():
                self._failed = torch.empty(1, dtype=packed.dtype, pin_memory=True)
            self._failed.copy_(packed[-1:], non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._failed = packed[-1:].clone()
        return packed[:-1].view_as(sums)

    def failures(self) -> int:
        """Ranks whose statistics failed at the last reduction; every rank reads the same number.

        On CUDA this waits for that reduction (a statistics step ago), not for the current step.
        """
        if self._failed is None:
            return 0
        if self._done is not None:
            self._done.synchronize()
        return int(self._failed.item())
