"""Bounded history of what each trainer rank sent: the memory a sidecar may use is fixed by config.

One ``SeriesHistory`` per (run, rank) holds numpy rings, allocated once and overwritten in
place, so memory stays flat however long a run lasts:

* steps and receive times: ``history.steps`` entries of 16 bytes;
* scalars by name: ``history.steps`` x (4 known + at most ``limits.max_scalar_names``) float32
  values plus a presence flag each (a scalar absent from a message is absent, not NaN: NaN is
  evidence of divergence and must stay distinguishable);
* the tensors x statistics matrix of the current layout: ``min(history.steps,
  history.max_matrix_bytes / bytes per matrix)`` matrices, and at least the latest one.

Layout change: the matrix ring holds one set of tensor names and statistic names.  A message
whose matrix has a different set resets that ring (the older matrices are dropped), since
rows of different shapes cannot share one array and merging them by name would break the
memory bound.  A message without a matrix (no tensors or no statistics) leaves the ring
alone, so a trainer may send scalars every step and per-tensor statistics every N steps.
Scalars are kept by name across layout changes.

``History`` bounds the number of series (``limits.max_series``), evicting the least
recently updated one.  It is not thread-safe: ``agent.state.AgentState`` guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from agent.protocol import StatsMessage

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


class SeriesHistory:
    """Rings of one (run, rank); see the module docstring for what is kept and how much."""

    def __init__(self, run: str, rank: int, *, steps: int, max_matrix_bytes: int, max_scalar_names: int):
        self.run, self.rank = run, rank
        self.capacity = steps
        self.max_matrix_bytes = max_matrix_bytes
        self.max_scalar_names = max_scalar_names
        self.sent = self.dropped = 0
        self.nonfinite_values = 0
        self.matrix_resets = 0
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
        self._tensors: tuple[str, ...] = ()
        self._stats: tuple[str, ...] = ()
        self._tensor_index: dict[str, int] = {}
        self._stat_index: dict[str, int] = {}
        self._matrix: np.ndarray | None = None
        self._matrix_steps = np.zeros(0, dtype=np.int64)
        self._matrix_count = 0

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
        layout = msg.layout
        if layout.tensors != self._tensors or layout.stats != self._stats or self._matrix is None:
            self._reset_matrix(layout.tensors, layout.stats)
        assert self._matrix is not None
        j = self._matrix_count % len(self._matrix)
        self._matrix[j] = msg.matrix
        self._matrix_steps[j] = msg.step
        self._matrix_count += 1

    def _reset_matrix(self, tensors: tuple[str, ...], stats: tuple[str, ...]) -> None:
        if self._matrix is not None:
            self.matrix_resets += 1
        row_bytes = len(tensors) * len(stats) * 4
        depth = max(1, min(self.capacity, self.max_matrix_bytes // row_bytes))
        self._matrix = None  # free the old ring before allocating the new one
        self._matrix = np.zeros((depth, len(tensors), len(stats)), dtype=np.float32)
        self._matrix_steps = np.zeros(depth, dtype=np.int64)
        self._matrix_count = 0
        self._tensors, self._stats = tensors, stats
        self._tensor_index = {name: i for i, name in enumerate(tensors)}
        self._stat_index = {name: i for i, name in enumerate(stats)}

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
        """Capacity of the matrix ring for the current layout (0 before the first matrix)."""
        return 0 if self._matrix is None else len(self._matrix)

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
        ti, si = self._tensor_index.get(tensor), self._stat_index.get(stat)
        if ti is None or si is None or self._matrix is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = _tail(_chronological(self._matrix_count, len(self._matrix)), last)
        return self._matrix_steps[idx], self._matrix[idx, ti, si]

    def latest_scalars(self) -> dict[str, float]:
        """Stored scalars of the latest message, by name."""
        return dict(self._latest_scalars)

    def latest_matrix(self) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray, int] | None:
        """(tensors, stats, copy of the latest matrix, its step), or None if no matrix arrived yet."""
        if self._matrix is None or not self._matrix_count:
            return None
        j = (self._matrix_count - 1) % len(self._matrix)
        return self._tensors, self._stats, self._matrix[j].copy(), int(self._matrix_steps[j])

    def snapshot(self) -> SeriesSnapshot:
        latest = self.latest_matrix()
        tensors, stats, matrix, matrix_step = latest if latest else ((), (), None, None)
        return SeriesSnapshot(
            run=self.run,
            rank=self.rank,
            step=self.latest_step if self._count else -1,
            received_at=self.latest_received_at or 0.0,
            sent=self.sent,
            dropped=self.dropped,
            nonfinite_values=self.nonfinite_values,
            scalars=self.latest_scalars(),
            tensors=tensors,
            stats=stats,
            matrix=matrix,
            matrix_step=matrix_step,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the numpy rings of this series."""
        arrays = [self._steps, self._times, self._values, self._present, self._matrix_steps]
        return sum(a.nbytes for a in arrays) + (0 if self._matrix is None else self._matrix.nbytes)


@dataclass(frozen=True)
class PushResult:
    series: SeriesHistory
    nonfinite: int
    evicted: SeriesKey | None
    scalar_overflow: bool


class History:
    """All tracked series, at most ``max_series`` of them, least recently updated evicted first."""

    def __init__(self, *, steps: int, max_series: int, max_matrix_bytes: int, max_scalar_names: int):
        self.steps = steps
        self.max_series = max_series
        self.max_matrix_bytes = max_matrix_bytes
        self.max_scalar_names = max_scalar_names
        self._series: OrderedDict[SeriesKey, SeriesHistory] = OrderedDict()

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
