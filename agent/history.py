"""Bounded history of what each trainer rank sent: the memory a sidecar may use is fixed by config.

One ``SeriesHistory`` per (run, rank) holds numpy rings, allocated once and overwritten in
place, so memory stays flat however long a run lasts:

* steps and receive times: ``history.steps`` entries of 16 bytes;
* scalars by name: ``history.steps`` x (4 known + at most ``limits.max_scalar_names``) float32
  values plus a presence flag each (a scalar absent from a message is absent, not NaN: NaN is
  evidence of divergence and must stay distinguishable);
* one tensors x statistics matrix ring per distinct layout (tensor names, statistic names),
  at most ``history.max_layouts`` of them; together they share ``history.max_matrix_bytes``
  evenly, each keeping ``min(history.steps, share / bytes per matrix)`` matrices, and at least
  the latest one (older layouts are dropped if even one matrix each would exceed the budget,
  so the bound stays ``max(history.max_matrix_bytes, one message's matrix)``).

Several layouts coexist because a trainer sends more than one kind of matrix: parameter
statistics (rows are parameter names) every N steps and, from the probes, activation
statistics (rows are module names such as ``h.0.attn``) in separate messages.  Each
(tensor, statistic) cell lives in exactly one ring: a layout that shares a cell with an older
ring *supersedes* it (the older ring is dropped and ``matrix_resets`` counts it), since that
means the trainer changed that kind of matrix (a parameter added, a statistic renamed) and
rows of different shapes cannot share one array.  Layouts with no cell in common (parameter
and probe statistics) keep their own rings; beyond ``max_layouts`` the least recently
updated ring is dropped.  A message without a matrix leaves the rings alone, so a trainer
may send scalars every step and per-tensor statistics every N steps.  Scalars are kept by
name across layout changes.

``History`` bounds the number of series (``limits.max_series``), evicting the least
recently updated one.  The matrices of a rank no predictor reads (every rank but 0 with
``predict.ranks: zero``) are kept one deep, the latest only, which is all /metrics shows: with
``publish.ranks: all`` on 1,024 ranks the history then holds one full-depth matrix history, not
1,024 of them.  It is not thread-safe: ``agent.state.AgentState`` guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sentinel_contract.protocol import StatsMessage

if TYPE_CHECKING:
    from agent.config import AgentConfig

KNOWN_SCALARS = ("loss", "grad_norm", "step_duration_seconds", "lr")

SeriesKey = tuple[str, int]


def _chronological(count: int, capacity: int) -> np.ndarray:
    """Ring indices of the held entries, oldest first."""
    n = min(count, capacity)
    return (np.arange(count - n, count) % capacity) if n else np.zeros(0, dtype=np.int64)


def _tail(idx: np.ndarray, last: int | None) -> np.ndarray:
    if last is None:
        return idx
    return idx[max(0, len(idx) - max(0, last)) :]


def count_nonfinite(msg: StatsMessage) -> int:
    """NaN and +-Inf values in a message's scalars and matrix."""
    return int(np.count_nonzero(~np.isfinite(msg.scalars)) + np.count_nonzero(~np.isfinite(msg.matrix)))


LayoutKey = tuple[tuple[str, ...], tuple[str, ...]]


class MatrixRing:
    """The tensors x statistics matrices of one layout, newest overwriting oldest."""

    def __init__(self, tensors: tuple[str, ...], stats: tuple[str, ...], depth: int):
        self.tensors, self.stats = tensors, stats
        self.tensor_index = {name: i for i, name in enumerate(tensors)}
        self.stat_index = {name: i for i, name in enumerate(stats)}
        self.values = np.zeros((depth, len(tensors), len(stats)), dtype=np.float32)
        self.steps = np.zeros(depth, dtype=np.int64)
        self.count = 0

    @property
    def key(self) -> LayoutKey:
        return self.tensors, self.stats

    @property
    def depth(self) -> int:
        return len(self.values)

    @property
    def row_bytes(self) -> int:
        return max(1, len(self.tensors) * len(self.stats) * 4)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.steps.nbytes

    def push(self, step: int, matrix: np.ndarray) -> None:
        j = self.count % self.depth
        self.values[j] = matrix
        self.steps[j] = step
        self.count += 1

    def order(self, last: int | None = None) -> np.ndarray:
        return _tail(_chronological(self.count, self.depth), last)

    def resize(self, depth: int) -> None:
        """Change the capacity, keeping the newest matrices."""
        if depth == self.depth:
            return
        idx = self.order(depth)
        values = np.zeros((depth, len(self.tensors), len(self.stats)), dtype=np.float32)
        steps = np.zeros(depth, dtype=np.int64)
        values[: len(idx)] = self.values[idx]
        steps[: len(idx)] = self.steps[idx]
        self.values, self.steps, self.count = values, steps, len(idx)

    def shares_a_cell(self, tensors: tuple[str, ...], stats: tuple[str, ...]) -> bool:
        return any(t in self.tensor_index for t in tensors) and any(s in self.stat_index for s in stats)

    def latest(self) -> MatrixSnapshot | None:
        if not self.count:
            return None
        j = (self.count - 1) % self.depth
        return MatrixSnapshot(self.tensors, self.stats, self.values[j].copy(), int(self.steps[j]))


@dataclass(frozen=True)
class MatrixSnapshot:
    """The latest matrix of one layout."""

    tensors: tuple[str, ...]
    stats: tuple[str, ...]
    matrix: np.ndarray
    step: int


@dataclass(frozen=True)
class StatWindow:
    """The last matrices of one layout for one statistic: ``values[i, r]`` is row ``r`` at ``steps[i]``."""

    tensors: tuple[str, ...]
    steps: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class SeriesSnapshot:
    """A copy of the latest values of one series, safe to read without the state lock."""

    run: str
    rank: int
    step: int
    received_at: float
    sent: int
    dropped: int
    nonfinite_values: int
    scalars: dict[str, float]
    tensors: tuple[str, ...]
    stats: tuple[str, ...]
    matrix: np.ndarray | None
    matrix_step: int | None
    matrices: tuple[MatrixSnapshot, ...] = ()


class SeriesHistory:
    """Rings of one (run, rank); see the module docstring for what is kept and how much."""

    def __init__(
        self,
        run: str,
        rank: int,
        *,
        steps: int,
        max_matrix_bytes: int,
        max_scalar_names: int,
        max_layouts: int = 8,
        matrix_depth: int | None = None,
    ):
        self.run, self.rank = run, rank
        self.capacity = steps
        self.matrix_capacity = steps if matrix_depth is None else max(1, min(steps, matrix_depth))
        self.max_matrix_bytes = max_matrix_bytes
        self.max_layouts = max_layouts
        self.max_scalar_names = max_scalar_names
        self.sent = self.dropped = 0
        self.nonfinite_values = 0
        self.matrix_resets = 0
        self.matrix_evictions = 0
        self._count = 0
        self._steps = np.zeros(steps, dtype=np.int64)
        self._times = np.zeros(steps, dtype=np.float64)
        self._columns: dict[str, int] = {}
        self._extra_names = 0
        self._scalar_overflow = False
        self._values = np.zeros((steps, 0), dtype=np.float32)
        self._present = np.zeros((steps, 0), dtype=bool)
        self._plan_key: tuple[str, ...] | None = None
        self._plan: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.intp), np.zeros(0, np.intp))
        self._latest_scalars: dict[str, float] = {}
        self._rings: OrderedDict[LayoutKey, MatrixRing] = OrderedDict()  # least recently updated first

    # -- writing -----------------------------------------------------------------------------

    def push(self, msg: StatsMessage, received_at: float) -> bool:
        """Record one message; True when scalar names were dropped for the first time in this series."""
        overflow_before = self._scalar_overflow
        src, dst = self._scalar_plan(msg.layout.scalars)
        i = self._count % self.capacity
        self._steps[i] = msg.step
        self._times[i] = received_at
        self._present[i, :] = False
        self._values[i, dst] = msg.scalars[src]
        self._present[i, dst] = True
        self._count += 1
        names = msg.layout.scalars
        self._latest_scalars = {names[s]: float(msg.scalars[s]) for s in src.tolist()}
        self.sent, self.dropped = msg.sent, msg.dropped
        self.nonfinite_values += count_nonfinite(msg)
        if msg.matrix.size:
            self._push_matrix(msg)
        return self._scalar_overflow and not overflow_before

    def _scalar_plan(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(message indices, column indices) of the scalars this series stores; cached per layout."""
        if names is self._plan_key:
            return self._plan
        src, dst = [], []
        for i, name in enumerate(names):
            col = self._columns.get(name)
            if col is None:
                if name not in KNOWN_SCALARS and self._extra_names >= self.max_scalar_names:
                    self._scalar_overflow = True
                    continue
                col = self._add_column(name)
            src.append(i)
            dst.append(col)
        self._plan_key = names
        self._plan = (np.asarray(src, dtype=np.intp), np.asarray(dst, dtype=np.intp))
        return self._plan

    def _add_column(self, name: str) -> int:
        col = len(self._columns)
        if col == self._values.shape[1]:
            limit = len(KNOWN_SCALARS) + self.max_scalar_names
            width = min(limit, max(4, 2 * col))
            values = np.zeros((self.capacity, width), dtype=np.float32)
            present = np.zeros((self.capacity, width), dtype=bool)
            values[:, :col] = self._values
            present[:, :col] = self._present
            self._values, self._present = values, present
        self._columns[name] = col
        if name not in KNOWN_SCALARS:
            self._extra_names += 1
        return col

    def _push_matrix(self, msg: StatsMessage) -> None:
        key = (msg.layout.tensors, msg.layout.stats)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._add_ring(*key)
        else:
            self._rings.move_to_end(key)
        ring.push(msg.step, msg.matrix)

    def _add_ring(self, tensors: tuple[str, ...], stats: tuple[str, ...]) -> MatrixRing:
        for old in [r for r in self._rings.values() if r.shares_a_cell(tensors, stats)]:
            del self._rings[old.key]
            self.matrix_resets += 1
        while len(self._rings) >= self.max_layouts:
            self._rings.popitem(last=False)
            self.matrix_evictions += 1
        ring = MatrixRing(tensors, stats, 1)
        self._rings[ring.key] = ring
        while len(self._rings) > 1 and sum(r.row_bytes for r in self._rings.values()) > self.max_matrix_bytes:
            self._rings.popitem(last=False)  # even one matrix each would break the budget
            self.matrix_evictions += 1
        share = self.max_matrix_bytes // len(self._rings)
        for r in self._rings.values():
            r.resize(max(1, min(self.matrix_capacity, share // r.row_bytes)))
        return ring

    def _ring_with(self, tensor: str, stat: str) -> MatrixRing | None:
        for ring in self._rings.values():
            if tensor in ring.tensor_index and stat in ring.stat_index:
                return ring
        return None

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages held (at most ``capacity``)."""
        return min(self._count, self.capacity)

    @property
    def total(self) -> int:
        """Messages recorded since this series was created."""
        return self._count

    @property
    def latest_step(self) -> int | None:
        return int(self._steps[(self._count - 1) % self.capacity]) if self._count else None

    @property
    def latest_received_at(self) -> float | None:
        return float(self._times[(self._count - 1) % self.capacity]) if self._count else None

    @property
    def matrix_depth(self) -> int:
        """Capacity of the matrix ring of the latest layout (0 before the first matrix)."""
        return next(reversed(self._rings.values())).depth if self._rings else 0

    @property
    def matrix_nbytes(self) -> int:
        """Bytes of matrix values held, all layouts (what ``max_matrix_bytes`` bounds)."""
        return sum(r.values.nbytes for r in self._rings.values())

    @property
    def layouts(self) -> list[LayoutKey]:
        """(tensors, stats) of every matrix ring held, least recently updated first."""
        return list(self._rings)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def steps(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, receive times) of the last ``last`` messages (all held if None), oldest first."""
        idx = _tail(_chronological(self._count, self.capacity), last)
        return self._steps[idx], self._times[idx]

    def scalar(self, name: str, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the last ``last`` messages that carried scalar ``name``, oldest first."""
        col = self._columns.get(name)
        if col is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = _chronological(self._count, self.capacity)
        idx = _tail(idx[self._present[idx, col]], last)
        return self._steps[idx], self._values[idx, col]

    def tensor_stat(self, tensor: str, stat: str, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of statistic ``stat`` of ``tensor`` over the last ``last`` matrices held."""
        ring = self._ring_with(tensor, stat)
        if ring is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = ring.order(last)
        return ring.steps[idx], ring.values[idx, ring.tensor_index[tensor], ring.stat_index[stat]]

    def stat_windows(self, stat: str, last: int | None = None) -> list[StatWindow]:
        """Statistic ``stat`` of every row, over the last ``last`` matrices of each layout carrying it."""
        out = []
        for ring in self._rings.values():
            si = ring.stat_index.get(stat)
            if si is not None and ring.count:
                idx = ring.order(last)
                out.append(StatWindow(ring.tensors, ring.steps[idx], ring.values[idx, :, si]))
        return out

    def latest_scalars(self) -> dict[str, float]:
        """Stored scalars of the latest message, by name."""
        return dict(self._latest_scalars)

    def latest_matrix(self) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray, int] | None:
        """(tensors, stats, copy of the latest matrix, its step) of the latest layout, or None."""
        if not self._rings:
            return None
        m = next(reversed(self._rings.values())).latest()
        return None if m is None else (m.tensors, m.stats, m.matrix, m.step)

    def latest_matrices(self) -> tuple[MatrixSnapshot, ...]:
        """The latest matrix of every layout, least recently updated first."""
        return tuple(m for m in (r.latest() for r in self._rings.values()) if m is not None)

    def snapshot(self, matrices: bool = True) -> SeriesSnapshot:
        """A copy of the latest values; ``matrices=False`` leaves the per-tensor statistics out."""
        matrices = self.latest_matrices() if matrices else ()
        latest = matrices[-1] if matrices else None
        return SeriesSnapshot(
            run=self.run,
            rank=self.rank,
            step=self.latest_step if self._count else -1,
            received_at=self.latest_received_at or 0.0,
            sent=self.sent,
            dropped=self.dropped,
            nonfinite_values=self.nonfinite_values,
            scalars=self.latest_scalars(),
            tensors=latest.tensors if latest else (),
            stats=latest.stats if latest else (),
            matrix=latest.matrix if latest else None,
            matrix_step=latest.step if latest else None,
            matrices=matrices,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the numpy rings of this series."""
        arrays = [self._steps, self._times, self._values, self._present]
        return sum(a.nbytes for a in arrays) + sum(r.nbytes for r in self._rings.values())


@dataclass(frozen=True)
class PushResult:
    series: SeriesHistory
    nonfinite: int
    evicted: SeriesKey | None
    scalar_overflow: bool


class History:
    """All tracked series, at most ``max_series`` of them, least recently updated evicted first."""

    def __init__(
        self,
        *,
        steps: int,
        max_series: int,
        max_matrix_bytes: int,
        max_scalar_names: int,
        max_layouts: int = 8,
        deep_ranks: str = "all",
    ):
        """``deep_ranks``: "zero" keeps the matrices of ranks other than 0 one deep (``predict.ranks: zero``)."""
        self.steps = steps
        self.deep_ranks = deep_ranks
        self.max_series = max_series
        self.max_matrix_bytes = max_matrix_bytes
        self.max_scalar_names = max_scalar_names
        self.max_layouts = max_layouts
        self._series: OrderedDict[SeriesKey, SeriesHistory] = OrderedDict()

    @classmethod
    def from_config(cls, config: AgentConfig) -> History:
        """The history the agent keeps with ``config``'s bounds (the daemon, replay, benchmarks)."""
        return cls(
            steps=config.history.steps,
            max_series=config.limits.max_series,
            max_matrix_bytes=config.history.max_matrix_bytes,
            max_scalar_names=config.limits.max_scalar_names,
            max_layouts=config.history.max_layouts,
            deep_ranks=config.predict.ranks if config.predict.enabled else "zero",
        )

    def push(self, msg: StatsMessage, received_at: float) -> PushResult:
        key = (msg.run, msg.rank)
        evicted = None
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.max_series:
                evicted, _ = self._series.popitem(last=False)
            series = SeriesHistory(
                msg.run,
                msg.rank,
                steps=self.steps,
                max_matrix_bytes=self.max_matrix_bytes,
                max_scalar_names=self.max_scalar_names,
                max_layouts=self.max_layouts,
                matrix_depth=1 if self.deep_ranks == "zero" and msg.rank != 0 else None,
            )
            self._series[key] = series
        else:
            self._series.move_to_end(key)
        before = series.nonfinite_values
        overflow = series.push(msg, received_at)
        return PushResult(series, series.nonfinite_values - before, evicted, overflow)

    def get(self, run: str, rank: int) -> SeriesHistory | None:
        return self._series.get((run, rank))

    def __len__(self) -> int:
        return len(self._series)

    def __iter__(self) -> Iterator[SeriesHistory]:
        """Series from least to most recently updated."""
        return iter(list(self._series.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._series

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._series.values())
