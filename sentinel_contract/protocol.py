"""Wire format of the statistics channel, schema version 1 (docs/protocol.md).

Both sides import this module; it needs only numpy and the standard library so the
sidecar runs without torch.  A message is three ZeroMQ frames:

1. header  -- UTF-8 JSON object: version, run, rank, step, time, counters, layout id;
2. layout  -- UTF-8 JSON object naming the scalars, the per-tensor statistics and the
              tensors (and, optionally, each tensor's role); its id is a hash of these
              bytes, so the receiver decodes it only the first time it sees an id;
3. data    -- little-endian float32: the scalars, then a tensors x stats matrix, row-major.

Nothing is unpickled: JSON and raw float32 only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

VERSION = 1
KIND_STATS = "stats"
DTYPE = np.dtype("<f4")
MAX_RUN_NAME = 128
MAX_NAME = 256
MAX_ROLE = 64
#: roles of parameter rows that are not weight matrices (gains, biases, other 1-D tensors)
VECTOR_ROLES = ("norm", "bias", "vector")
#: job-level scalars rank 0 sends under torch.distributed: each rank's loss, step time and error count
#: reduced over the job (min/mean/max and the rank of the max; sentinel/rank_reduce.py, docs/metrics.md)
JOB_SCALARS = (
    "loss_min",
    "loss_mean",
    "loss_max",
    "loss_max_rank",
    "loss_nonfinite_ranks",
    "step_seconds_min",
    "step_seconds_mean",
    "step_seconds_max",
    "step_seconds_max_rank",
    "errors_max",
    "errors_max_rank",
)
INT64_MAX = (1 << 63) - 1

REJECT_REASONS = (
    "frame_count",
    "malformed_header",
    "unsupported_version",
    "bad_field",
    "malformed_layout",
    "layout_mismatch",
    "size_mismatch",
    "oversized",
)


class ProtocolError(ValueError):
    """A message the receiver must reject; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Layout:
    """The names behind a message's numbers; a dictionary key on the agent's hot path, so its hash
    (over 1,000 tensor names, say) is computed once.

    ``roles`` is empty or parallel to ``tensors``: what each row is (``"qkv"``, ``"norm"``,
    ``"matrix"``...; docs/protocol.md lists the values), so the agent can tell weight matrices
    from gains and biases whatever the model's naming style.  It is encoded only when non-empty,
    so a layout without roles keeps the bytes, and the id, it always had.
    """

    scalars: tuple[str, ...]
    stats: tuple[str, ...]
    tensors: tuple[str, ...]
    roles: tuple[str, ...] = ()
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.roles and len(self.roles) != len(self.tensors):
            raise ValueError(f"{len(self.roles)} roles for {len(self.tensors)} tensors")
        object.__setattr__(self, "_hash", hash((self.scalars, self.stats, self.tensors, self.roles)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:
        return Layout, (self.scalars, self.stats, self.tensors, self.roles)  # str hashes differ between processes

    @property
    def size(self) -> int:
        return len(self.scalars) + len(self.stats) * len(self.tensors)

    def encode(self) -> bytes:
        obj = {"scalars": list(self.scalars), "stats": list(self.stats), "tensors": list(self.tensors)}
        if self.roles:
            obj["roles"] = list(self.roles)
        return json.dumps(obj, separators=(",", ":")).encode()


def layout_id(layout_bytes: bytes) -> str:
    return hashlib.blake2b(layout_bytes, digest_size=8).hexdigest()


@dataclass(frozen=True)
class StatsMessage:
    run: str
    rank: int
    step: int
    time: float
    seq: int
    sent: int
    dropped: int
    layout: Layout
    scalars: np.ndarray  # (n_scalars,) float32
    matrix: np.ndarray  # (n_tensors, n_stats) float32

    def scalar(self, name: str) -> float | None:
        try:
            return float(self.scalars[self.layout.scalars.index(name)])
        except ValueError:
            return None


def encode_header(
    *, run: str, rank: int, step: int, time: float, seq: int, sent: int, dropped: int, layout: str
) -> bytes:
    return json.dumps(
        {
            "v": VERSION,
            "kind": KIND_STATS,
            "run": run,
            "rank": rank,
            "step": step,
            "time": time,
            "seq": seq,
            "sent": sent,
            "dropped": dropped,
            "layout": layout,
        },
        separators=(",", ":"),
    ).encode()


def _json(raw: bytes, reason: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(reason, str(exc)[:200]) from None


def _valid_text(value: object, max_len: int) -> bool:
    """A non-empty str of at most max_len characters that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _int_field(header: dict, key: str) -> int:
    value = header.get(key)
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise ProtocolError("bad_field", f"{key} is not an integer in [0, 2^63)")
    return value


def _valid_role(value: object) -> bool:
    """A str of 0..MAX_ROLE characters that encodes as UTF-8 ("" is a row of no particular role)."""
    return value == "" or _valid_text(value, MAX_ROLE)


def _parse_layout(raw: bytes) -> Layout:
    obj = _json(raw, "malformed_layout")
    if not isinstance(obj, dict):
        raise ProtocolError("malformed_layout", "layout is not a JSON object")
    parts = []
    for key in ("scalars", "stats", "tensors"):
        names = obj.get(key)
        if not isinstance(names, list):
            raise ProtocolError("malformed_layout", f"{key} is not a list")
        if not all(_valid_text(n, MAX_NAME) for n in names):
            raise ProtocolError("malformed_layout", f"{key}: names must be UTF-8 strings of 1..{MAX_NAME} characters")
        if len(set(names)) != len(names):
            raise ProtocolError("malformed_layout", f"{key}: duplicate names")
        parts.append(tuple(names))
    roles = obj.get("roles", [])
    if not isinstance(roles, list) or ("roles" in obj and len(roles) != len(parts[2])):
        raise ProtocolError("malformed_layout", "roles is not a list with one entry per tensor")
    if not all(_valid_role(r) for r in roles):
        raise ProtocolError("malformed_layout", f"roles must be UTF-8 strings of 0..{MAX_ROLE} characters")
    return Layout(*parts, roles=tuple(roles))


def decode(frames: list[bytes], layouts: dict[str, Layout], *, max_bytes: int, max_layouts: int = 1024) -> StatsMessage:
    """Validate and decode one message; raise ProtocolError with a reason otherwise.

    ``layouts`` is the receiver's cache of decoded layouts, updated in place and
    bounded by ``max_layouts`` (oldest evicted).
    """
    if len(frames) != 3:
        raise ProtocolError("frame_count", f"{len(frames)} frames, expected 3")
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError("oversized", f"{total} bytes > limit {max_bytes}")
    header = _json(frames[0], "malformed_header")
    if not isinstance(header, dict):
        raise ProtocolError("malformed_header", "header is not a JSON object")
    version = header.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError("unsupported_version", f"v={str(version)[:20]!r}, this agent speaks {VERSION}")
    if header.get("kind") != KIND_STATS:
        raise ProtocolError("bad_field", f"kind={str(header.get('kind'))[:20]!r}")
    run = header.get("run")
    if not _valid_text(run, MAX_RUN_NAME):
        raise ProtocolError("bad_field", f"run must be a UTF-8 string of 1..{MAX_RUN_NAME} characters")
    rank, step, seq, sent, dropped = (_int_field(header, k) for k in ("rank", "step", "seq", "sent", "dropped"))
    t = header.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise ProtocolError("bad_field", "time is not a finite number")
    lid = header.get("layout")
    if not isinstance(lid, str) or len(lid) != 16 or not all(c in "0123456789abcdef" for c in lid):
        raise ProtocolError("bad_field", "layout must be 16 lowercase hex digits")

    layout = layouts.get(lid)
    if layout is None:
        if layout_id(frames[1]) != lid:
            raise ProtocolError("layout_mismatch", f"layout frame does not hash to {lid}")
        layout = _parse_layout(frames[1])
        if len(layouts) >= max_layouts:
            layouts.pop(next(iter(layouts)))
        layouts[lid] = layout

    expected = layout.size * DTYPE.itemsize
    if len(frames[2]) != expected:
        raise ProtocolError("size_mismatch", f"data frame has {len(frames[2])} bytes, layout needs {expected}")
    data = np.frombuffer(frames[2], dtype=DTYPE)
    n = len(layout.scalars)
    return StatsMessage(
        run=run,
        rank=rank,
        step=step,
        time=float(t),
        seq=seq,
        sent=sent,
        dropped=dropped,
        layout=layout,
        scalars=data[:n],
        matrix=data[n:].reshape(len(layout.tensors), len(layout.stats)),
    )
