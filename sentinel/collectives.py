"""The few collectives sentinel's control plane needs, on a CPU (gloo) group.

Why a separate group: commands and checkpoint verdicts are tiny host-side values; moving them
through NCCL would force a device sync at every step boundary.  When the default group already
has a CPU backend it is reused; otherwise one gloo group is created (a collective call, so
every rank creates it at ``attach``, in the same order).  Without an initialised process group
everything here is the single-process identity, at no cost.  Nothing is pickled: payloads are
JSON bytes in a uint8 tensor, length first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

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
