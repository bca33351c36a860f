"""Least-squares lines and early baselines: the arithmetic under every trend predictor.

``fit_lines`` fits one line per column of a window at once (numpy, no Python loop over the
rows: a large model has 1,000 of them); ``LogRows`` reuses the logarithms of the rows a new window
shares with the previous one; ``Baselines`` keeps each row's early value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

MAX_BASELINES = 65_536


def median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a non-empty 1-D array of finite values, bitwise, without
    np.median's per-call overhead (it runs several times per message)."""
    h = len(values) // 2
    if len(values) % 2:
        return 0.0 + float(np.partition(values, h)[h])  # 0.0 + x: np.mean's sum turns -0.0 into 0.0
    part = np.partition(values, (h - 1, h))
    return float((0.0 + part[h - 1] + part[h]) / 2.0)


def fit_lines(
    x: np.ndarray, y: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares line per column of ``y`` (m x n) over ``x`` (m,), using the cells where ``ok``.

    Returns (slope, fitted value at x[-1], R², points used, t-statistic of the slope), each of
    shape (n,); t = slope / standard error = sqrt(R² (n - 2) / (1 - R²)), inf for a perfect line.
    """
    xx = x.astype(np.float64)[:, None]
    if ok.all():  # every cell usable: x is shared by every column, so Sxx is one number and Sxy a matrix product
        m, cols = y.shape
        n = np.full(cols, float(m))
        xm = np.full(cols, float(xx.mean()) if m else 0.0)
        dx = xx[:, 0] - xm[:1]
        ym = y.sum(axis=0) / max(m, 1)
        dy = y - ym
        sxx = np.full(cols, float(dx @ dx))
        sxy, syy = dx @ dy, np.einsum("ij,ij->j", dy, dy)
    else:
        w = ok.astype(np.float64)
        y = np.where(ok, y, 0.0)
        n = w.sum(axis=0)
        safe_n = np.maximum(n, 1.0)
        xm = (w * xx).sum(axis=0) / safe_n
        ym = (w * y).sum(axis=0) / safe_n
        dx, dy = (xx - xm) * w, (y - ym) * w
        sxx, sxy, syy = (dx * dx).sum(axis=0), (dx * dy).sum(axis=0), (dy * dy).sum(axis=0)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    at_last = ym + slope * (float(x[-1]) - xm)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where((sxx > 0) & (syy > 0), (sxy * sxy) / (sxx * syy), 0.0)
        r2 = np.clip(r2, 0.0, 1.0)
        t = np.where(r2 >= 1.0, np.inf, np.sqrt(r2 * np.maximum(n - 2, 0) / np.maximum(1.0 - r2, 1e-300)))
    return slope, at_last, r2, n, t


def current_segment(steps: np.ndarray, min_step: int) -> slice:
    """The trailing part of a window with strictly increasing steps, at or after ``min_step``
    (after a rollback the ring holds two timelines; only the current one can be fitted)."""
    drops = np.flatnonzero(np.diff(steps) <= 0)
    start = int(drops[-1]) + 1 if len(drops) else 0
    start = max(start, int(np.searchsorted(steps[start:], min_step)) + start)
    return slice(start, len(steps))


class LogRows:
    """``np.log`` of a window, reusing the rows of the previous window that are unchanged.

    Consecutive windows of a trend share all but their newest row, so logging the whole
    window on every message (50 x 1,000 values for a large model) repeats work; a row is
    reused only when its step and every input value are bitwise the same as before, so
    the result is exactly ``np.log(x)`` (the logarithm works value by value).
    """

    def __init__(self) -> None:
        self._steps: np.ndarray | None = None
        self._x = self._y = np.zeros((0, 0))

    def __call__(self, steps: np.ndarray, x: np.ndarray) -> np.ndarray:
        prev = self._steps
        done = 0
        y = np.empty_like(x, dtype=np.float64)
        if prev is not None and len(prev) and len(steps) and self._x.shape[1:] == x.shape[1:]:
            k = int(np.searchsorted(prev, steps[0]))
            length = min(len(prev) - k, len(steps))
            if (
                length > 0
                and np.array_equal(prev[k : k + length], steps[:length])
                and np.array_equal(self._x[k : k + length], x[:length])
            ):
                y[:length] = self._y[k : k + length]
                done = length
        y[done:] = np.log(x[done:])
        self._steps, self._x, self._y = steps, x, y
        return y


class Baselines:
    """Early value of each (predictor, row): the median of its first ``points`` usable values."""

    def __init__(self, points: int, limit: int = MAX_BASELINES):
        self.points, self.limit = points, limit
        self._values: dict[tuple[str, str], list[float] | float] = {}
        self._offered: dict[tuple[str, str], int] = {}  # the last step offered per row

    def offer(self, key: tuple[str, str], steps: np.ndarray, values: np.ndarray) -> float | None:
        """The row's baseline, feeding it the finite values of a window whose steps it has not seen yet
        (consecutive windows overlap: each step counts once)."""
        settled = self.settled(key)
        if settled is not None:
            return settled
        seen = self._offered.get(key, -1)
        fresh = [v for s, v in zip(steps.tolist(), values.tolist()) if s > seen and math.isfinite(v)]
        if len(steps) and (key in self._offered or len(self._offered) < self.limit):
            self._offered[key] = max(seen, int(steps[-1]))
        return self.update(key, fresh)

    def settled(self, key: tuple[str, str]) -> float | None:
        entry = self._values.get(key)
        return entry if isinstance(entry, float) else None

    def update(self, key: tuple[str, str], values: Iterable[float]) -> float | None:
        entry = self._values.get(key)
        if isinstance(entry, float):
            return entry
        if entry is None:
            if len(self._values) >= self.limit:
                return None
            entry = self._values[key] = []
        for v in values:
            if len(entry) >= self.points:
                break
            entry.append(float(v))
        if len(entry) >= self.points:
            self._values[key] = float(np.median(entry))
            return self._values[key]
        return None
