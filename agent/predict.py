"""Predictors: what the agent concludes from the statistics of one run/rank (docs/policy.md).

Two kinds, both fed by every accepted message of the ranks chosen by ``predict.ranks``:

* **Spike detectors** on the ``loss`` and ``grad_norm`` scalars.  A value is an outlier when its
  robust z-score against a rolling window (median and MAD, scaled by 1.4826 to estimate σ) or
  an EMA (ZClip's α = 0.97) reaches ``z`` *and* it is at least ``min_ratio`` times the window's
  centre; it is critical at ``critical_ratio`` times.  The defaults sit between the peers: the
  window of 128 is OLMo-core's, z = 6 its 6σ (a MAD-based σ does not grow with the spike it is
  meant to catch), and the ratios echo llm-foundry's 2× and Megatron-LM's 10×.  Outliers never
  enter the window, so a spike cannot raise the bar for the next one; after
  ``rebaseline_after`` consecutive outliers the level is taken as the new normal.  A NaN or
  ±Inf loss or gradient norm is a critical ``nonfinite`` detection at once, with no warm-up
  (Megatron-LM treats it as fatal).
* **Trend predictors** over the per-tensor (and probe) statistics, each with an ETA in steps
  from a least-squares line through the last ``trend.window`` matrices: max attention logit
  towards 1e4 on a log scale (Wortsman et al. §3.1.1: every run past 1e4 diverged); linear
  output RMS against its own early baseline (Rybakov et al.: QKV/Proj/FC2 outputs grow more than
  2× before divergence); update ratio ‖ΔW‖/‖W‖ per matrix, divided by the learning rate so a
  warm-up does not look like growth, and its spread across matrices (WeSaR, Nishida et al.);
  Adam's √v̂ (or the gradient RMS) falling towards ε (Wortsman §3.4); log Z drifting from its
  early value (Wortsman §3.1.2).  A predictor whose statistics never arrive stays quiet.

Detections are edge-triggered: one per episode (a run of consecutive outliers, or a layer
entering the warning or critical zone), again only if the severity rises.  ``risk()`` folds
the latest detections (decaying over ``detection_decay_steps``) and forecasts (1 at ETA 0,
0 at ETA ≥ ``horizon_steps``) into one score in [0, 1] with a one-line explanation.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from agent.events import plain
from agent.history import SeriesHistory, StatWindow
from agent.protocol import Layout, StatsMessage
from agent.typedconfig import option

logger = logging.getLogger("sentinel.agent")

SEVERITIES = ("warning", "critical")
DETECTORS = (
    "nonfinite",
    "loss_spike",
    "grad_norm_spike",
    "attn_logit",
    "out_rms",
    "update_ratio",
    "update_ratio_spread",
    "adam_eps",
    "log_z",
)
TREND_PREDICTORS = DETECTORS[3:]
MAD_TO_SIGMA = 1.4826
MAX_BASELINES = 65_536
MAX_LAYOUTS = 64


def severity_rank(severity: str | None) -> int:
    return 0 if severity is None else SEVERITIES.index(severity) + 1


# -- configuration -------------------------------------------------------------------------------


@dataclass
class SpikeConfig:
    enabled: bool = option(True, doc="Run this spike detector.")
    method: str = option(
        "mad",
        choices=("mad", "ema"),
        doc="Baseline of the robust z-score: 'mad' = rolling median and MAD over `window` values "
        "(OLMo-core's window); 'ema' = exponential mean and variance with `ema_alpha` (ZClip).",
    )
    window: int = option(128, range=(8, 100_000), doc="Values in the rolling window (method 'mad').")
    warmup: int = option(
        64, range=(2, 100_000), doc="Values collected before the detector may fire (NaN/Inf fire at once)."
    )
    z: float = option(6.0, range=(1.0, 1e6), doc="Robust z-score from which a value is an outlier.")
    min_ratio: float = option(
        1.1, range=(1.0, 1e12), doc="An outlier must also be at least this many times the baseline centre."
    )
    critical_ratio: float = option(
        1.5, range=(1.0, 1e12), doc="An outlier at least this many times the baseline centre is critical."
    )
    ema_alpha: float = option(0.97, range=(0.0, 0.9999), doc="EMA decay of method 'ema' (ZClip's default).")
    log_scale: bool = option(
        False, doc="Score log(value): for positive, multiplicative quantities such as a gradient norm."
    )
    rebaseline_after: int = option(
        64,
        range=(0, 1_000_000),
        doc="After this many consecutive outliers the new level becomes the baseline (0: never).",
    )


@dataclass
class GradNormSpikeConfig(SpikeConfig):
    min_ratio: float = option(
        2.0, range=(1.0, 1e12), doc="An outlier must also be at least this many times the baseline centre."
    )
    critical_ratio: float = option(
        10.0, range=(1.0, 1e12), doc="An outlier at least this many times the baseline centre is critical."
    )
    log_scale: bool = option(
        True, doc="Score log(value): for positive, multiplicative quantities such as a gradient norm."
    )


@dataclass
class TrendConfig:
    window: int = option(50, range=(4, 100_000), doc="Matrices (messages with per-tensor statistics) in each fit.")
    min_points: int = option(16, range=(3, 100_000), doc="Fewest finite points a fit needs to give an ETA.")
    min_t: float = option(
        8.0,
        range=(0.0, 1e6),
        doc="Smallest t-statistic of the fitted slope (slope / its standard error) for an ETA to count; "
        "guards against noise extrapolated into a trend.",
    )
    warmup_steps: int = option(
        100, range=(0, 100_000_000), doc="Steps before which trend predictors ignore the statistics."
    )
    warn_eta_steps: int = option(200, range=(0, 100_000_000), doc="An ETA at or below this is a warning detection.")
    max_eta_steps: int = option(
        100_000, range=(1, 1_000_000_000), doc="ETAs beyond this are not reported (extrapolating too far)."
    )
    baseline_points: int = option(
        10, range=(1, 10_000), doc="Values whose median is a row's early baseline (out_rms, log Z, spread)."
    )
    every_steps: int = option(
        20,
        range=(1, 100_000),
        doc="Refit the trend lines of a layout whose last fit found nothing once this many steps have passed "
        "(1: on every message); a layout with a forecast is refitted on every message, and a value newly past "
        "a predictor's limit refits at once, so only the first sight of a trend can come up to every_steps - 1 "
        "steps late.  A value above `window` counts as `window`, so that consecutive fits leave no step unseen.",
    )


@dataclass
class AttnLogitConfig:
    enabled: bool = option(True, doc="Watch statistic `attn_logit_max` (per module, from the probes).")
    limit: float = option(1e4, range=(1.0, 1e30), doc="Max attention logit treated as divergence (Wortsman §3.1.1).")


@dataclass
class OutRmsConfig:
    enabled: bool = option(True, doc="Watch statistic `out_rms` (per linear module, from the probes).")
    max_growth: float = option(
        2.0, range=(1.0, 1e6), doc="Growth over the row's early baseline treated as divergence (Rybakov et al.)."
    )


@dataclass
class UpdateRatioConfig:
    enabled: bool = option(True, doc="Watch statistic `update_ratio` per matrix and its spread across matrices.")
    limit: float = option(0.1, range=(1e-12, 1e6), doc="Update ratio ||dW||/||W|| treated as divergence.")
    max_spread_growth: float = option(
        4.0, range=(1.0, 1e6), doc="Growth of the spread (max / median over matrices) over its early value."
    )
    exclude: list[str] = option(
        ["bias", "norm", "ln_"],
        doc="Rows whose name contains one of these substrings are ignored (biases and normalisation "
        "gains are not the matrices WeSaR is about; a zero-initialised bias has a huge ratio).",
    )


@dataclass
class AdamEpsConfig:
    enabled: bool = option(True, doc="Watch `sqrt_v_rms` (else `grad_rms`) falling towards Adam's eps.")
    eps: float = option(1e-8, range=(0.0, 1.0), doc="Adam eps when the trainer sends no scalar `adam_eps`.")
    margin: float = option(10.0, range=(1.0, 1e6), doc="A value below margin x eps is a warning.")


@dataclass
class LogZConfig:
    enabled: bool = option(True, doc="Watch scalar `log_z_mean` and statistic/scalar `log_z_max`.")
    max_drift: float = option(
        10.0, range=(1e-6, 1e6), doc="Drift of log Z from its early value treated as divergence (nats)."
    )


@dataclass
class PredictConfig:
    enabled: bool = option(True, doc="Run the predictors (and so the policy).")
    ranks: str = option(
        "zero",
        choices=("zero", "all"),
        doc="Ranks whose statistics feed the predictors and the recording: rank 0 only, or every rank.",
    )
    horizon_steps: int = option(
        1000, range=(1, 100_000_000), doc="Forecast risk falls linearly from 1 at ETA 0 to 0 at this ETA."
    )
    detection_decay_steps: int = option(
        100, range=(1, 100_000_000), doc="Steps over which a detection's contribution to the risk decays to 0."
    )
    loss: SpikeConfig = field(default_factory=SpikeConfig)
    grad_norm: GradNormSpikeConfig = field(default_factory=GradNormSpikeConfig)
    trend: TrendConfig = field(default_factory=TrendConfig)
    attn_logit: AttnLogitConfig = field(default_factory=AttnLogitConfig)
    out_rms: OutRmsConfig = field(default_factory=OutRmsConfig)
    update_ratio: UpdateRatioConfig = field(default_factory=UpdateRatioConfig)
    adam_eps: AdamEpsConfig = field(default_factory=AdamEpsConfig)
    log_z: LogZConfig = field(default_factory=LogZConfig)


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """Something a predictor saw at one step, with the evidence a person needs to check it."""

    run: str
    rank: int
    step: int
    detector: str
    severity: str
    statistic: str
    value: float
    message: str
    layer: str | None = None
    eta_steps: float | None = None
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return plain(
            {
                "run": self.run,
                "rank": self.rank,
                "step": self.step,
                "detector": self.detector,
                "severity": self.severity,
                "statistic": self.statistic,
                "layer": self.layer,
                "value": self.value,
                "eta_steps": self.eta_steps,
                "message": self.message,
                "evidence": self.evidence,
            }
        )


@dataclass(frozen=True)
class Forecast:
    """A trend predictor's view of one layer at its latest matrix."""

    predictor: str
    layer: str
    statistic: str
    value: float
    step: int
    eta_steps: float | None
    severity: str | None
    risk: float
    message: str
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Risk:
    score: float
    explanation: str
    predictor: str | None = None
    layer: str | None = None


# -- spike detectors -----------------------------------------------------------------------------


def _median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a non-empty 1-D array of finite values, bitwise, without
    np.median's per-call overhead (it runs several times per message)."""
    h = len(values) // 2
    if len(values) % 2:
        return 0.0 + float(np.partition(values, h)[h])  # 0.0 + x: np.mean's sum turns -0.0 into 0.0
    part = np.partition(values, (h - 1, h))
    return float((0.0 + part[h - 1] + part[h]) / 2.0)


class SpikeDetector:
    """Robust z-score of one scalar against a window that outliers never enter."""

    def __init__(self, detector: str, statistic: str, cfg: SpikeConfig):
        self.detector, self.statistic, self.cfg = detector, statistic, cfg
        self.window: deque[tuple[int, float]] = deque(maxlen=cfg.window)
        self._values: deque[float] = deque(maxlen=cfg.window)  # the window's values, for a fast np.array
        self.outliers: list[tuple[int, float]] = []
        self.episode: str | None = None
        self._ema_mean = self._ema_var = 0.0
        self._ema_n = 0

    def _centre(self) -> tuple[float, np.ndarray | None] | None:
        """(centre, the window's values with method 'mad') or None during warm-up."""
        if self.cfg.method == "ema":
            return None if self._ema_n < self.cfg.warmup else (self._ema_mean, None)
        if len(self.window) < min(self.cfg.warmup, self.cfg.window):
            return None
        values = np.array(self._values, dtype=np.float64)
        return _median(values), values

    def _sigma(self, centre: float, values: np.ndarray | None) -> tuple[float, int]:
        """(sigma, values it rests on) around ``centre``."""
        if values is None:
            return math.sqrt(max(self._ema_var, 0.0)), self._ema_n
        return MAD_TO_SIGMA * _median(np.abs(values - centre)), len(values)

    def _accept(self, step: int, value: float) -> None:
        self.window.append((step, value))
        self._values.append(value)
        if self.cfg.method == "ema":
            self._ema_n += 1
            if self._ema_n == 1:
                self._ema_mean, self._ema_var = value, 0.0
            elif self._ema_n <= self.cfg.warmup:  # plain running mean/variance during warm-up
                delta = value - self._ema_mean
                self._ema_mean += delta / self._ema_n
                self._ema_var += (delta * (value - self._ema_mean) - self._ema_var) / self._ema_n
            else:
                a = self.cfg.ema_alpha
                self._ema_mean = a * self._ema_mean + (1 - a) * value
                self._ema_var = a * self._ema_var + (1 - a) * (value - self._ema_mean) ** 2

    def update(self, run: str, rank: int, step: int, value: float) -> Detection | None:
        """Feed one finite value; a Detection when it opens (or worsens) a spike episode."""
        if self.cfg.log_scale:
            if value <= 0:
                return None  # no gradient this step: nothing to score
            x = math.log(value)
        else:
            x = value
        base = self._centre()
        if base is None:
            self._accept(step, x)
            return None
        centre, values = base
        raw_centre = math.exp(centre) if self.cfg.log_scale else centre
        ratio = value / raw_centre if raw_centre > 0 else math.inf
        z = sigma = 0.0
        if ratio >= self.cfg.min_ratio:  # else no outlier whatever its z: the spread is not needed
            sigma, n = self._sigma(centre, values)
            z = (x - centre) / max(sigma, 1e-12 * max(abs(centre), 1e-30))
        centre = raw_centre
        if not (z >= self.cfg.z and ratio >= self.cfg.min_ratio):
            self._accept(step, x)
            self.outliers.clear()
            self.episode = None
            return None
        self.outliers.append((step, x))
        if self.cfg.rebaseline_after and len(self.outliers) >= self.cfg.rebaseline_after:
            logger.info(
                "%s: %d consecutive outliers of %s in run %s; taking the new level as the baseline",
                self.detector,
                len(self.outliers),
                self.statistic,
                run,
            )
            self.rewind(0)
            for s, v in self.outliers[-self.cfg.window :]:
                self._accept(s, v)
            self.outliers.clear()
            return None
        severity = "critical" if ratio >= self.cfg.critical_ratio else "warning"
        if severity_rank(severity) <= severity_rank(self.episode):
            return None
        self.episode = severity
        ratio_text = f"{ratio:.2f}×" if math.isfinite(ratio) else "far above"
        if self.cfg.method == "mad":
            base_text = f"the median {centre:.4g} of the last {n} values"
        else:
            base_text = f"the EMA mean {centre:.4g} (alpha {self.cfg.ema_alpha:g})"
        scale = " of log values" if self.cfg.log_scale else ""
        message = (
            f"{self.statistic} {value:.4g} at step {step} is {ratio_text} {base_text} "
            f"(robust z{scale} {z:.1f} ≥ {self.cfg.z:g})"
        )
        evidence = {
            "method": self.cfg.method,
            "log_scale": self.cfg.log_scale,
            "centre": centre,
            "sigma": sigma,  # of log values with log_scale
            "z": z,
            "ratio": ratio,
            "window_values": n,
            "window_first_step": self.window[0][0] if self.window else None,
            "z_threshold": self.cfg.z,
            "min_ratio": self.cfg.min_ratio,
            "critical_ratio": self.cfg.critical_ratio,
        }
        return Detection(run, rank, step, self.detector, severity, self.statistic, value, message, evidence=evidence)

    def rewind(self, to_step: int) -> None:
        """Forget values from steps at or after ``to_step`` (the trainer went back)."""
        kept = [(s, v) for s, v in self.window if s < to_step]
        self.window.clear()
        self._values.clear()
        self._ema_n = 0
        self.outliers.clear()
        self.episode = None
        for s, v in kept:
            self._accept(s, v)


# -- trend predictors ----------------------------------------------------------------------------


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


def _current_segment(steps: np.ndarray, min_step: int) -> slice:
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


class Spread(NamedTuple):
    """One message's update-ratio spread: max / median over its matrices (WeSaR, Nishida et al.)."""

    value: float
    baseline: float | None  # the early spread, once settled
    matrices: int


class TrendPredictors:
    """Every trend predictor of one run/rank; ``update`` returns their forecasts for the message.

    A least-squares fit over a window of 1,000 tensors costs several times more than taking in the
    message, and while nothing trends there is nothing for a fit to follow closely, so a quiet
    layout is refitted every ``trend.every_steps`` steps.  A layout whose last fit found a
    forecast is refitted on every message, so a trend's ETA warning comes at its step once the
    trend has been seen.  What cannot wait is checked on every message at the cost of a
    comparison per row: a value newly past its limit (``_newly_past``) refits at once, so a
    critical detection is never late.
    """

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg
        self.baselines = Baselines(cfg.trend.baseline_points)
        self._baseline_seen: dict[tuple[str, str], int] = {}
        self._spread: deque[tuple[int, float, str]] = deque(maxlen=max(cfg.trend.window, cfg.trend.baseline_points))
        self._logs = {name: LogRows() for name in ("attn_logit", "out_rms", "update_ratio", "adam_eps")}
        self._excluded_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._excluded_mask = np.zeros(0, dtype=bool)
        self._fitted_at: dict[Layout, int] = {}
        self._trending: set[Layout] = set()  # layouts whose last fit gave a forecast: refitted on every message
        self._out_rms_base: dict[tuple[str, ...], np.ndarray] = {}

    def update(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast] | None:
        """Forecasts of the predictors this message's layout feeds; None when no refit was due
        (the forecasts of its last fit stand)."""
        c = self.cfg
        stats, scalars = set(msg.layout.stats), set(msg.layout.scalars)
        if msg.step < c.trend.warmup_steps:
            return []
        spread = self._track_spread(msg) if c.update_ratio.enabled and "update_ratio" in stats else None
        last = self._fitted_at.get(msg.layout)
        every = min(c.trend.every_steps, c.trend.window)
        due = last is None or msg.layout in self._trending or not last < msg.step < last + every
        if not due and not self._newly_past(msg, spread):
            return None
        if len(self._fitted_at) >= MAX_LAYOUTS and msg.layout not in self._fitted_at:
            self._fitted_at.clear()
            self._trending.clear()
            self._out_rms_base.clear()
        out: list[Forecast] = []
        if c.attn_logit.enabled and "attn_logit_max" in stats:
            out += self._attn_logit(msg, series)
        if c.out_rms.enabled and "out_rms" in stats:
            out += self._out_rms(msg, series)
        if spread is not None:
            out += self._update_ratio(msg, series)
            out += self._update_spread(spread)
        if c.adam_eps.enabled and ({"sqrt_v_rms", "grad_rms"} & stats):
            out += self._adam_eps(msg, series)
        if c.log_z.enabled and ({"log_z_max"} & stats or {"log_z_mean", "log_z_max"} & scalars):
            out += self._log_z(msg, series)
        self._fitted_at[msg.layout] = msg.step
        (self._trending.add if out else self._trending.discard)(msg.layout)
        return out

    def rewind(self) -> None:
        """The trainer went back: refit on the next message of every layout."""
        self._fitted_at.clear()
        self._trending.clear()

    def _newly_past(self, msg: StatsMessage, spread: Spread | None) -> bool:
        """Whether a value of this message is past its predictor's limit (new: the layout's last
        fit found nothing)."""
        c, stats, m = self.cfg, msg.layout.stats, msg.matrix
        past: list[np.ndarray] = []  # per predictor, its rows past the limit
        if c.attn_logit.enabled and "attn_logit_max" in stats:
            past.append(m[:, stats.index("attn_logit_max")] >= c.attn_logit.limit)
        base = self._out_rms_base.get(msg.layout.tensors)
        if c.out_rms.enabled and "out_rms" in stats and base is not None:
            past.append(m[:, stats.index("out_rms")] >= c.out_rms.max_growth * base)
        if spread is not None:
            past.append(
                (m[:, stats.index("update_ratio")] >= c.update_ratio.limit) & ~self._excluded(msg.layout.tensors)
            )
            start = spread.baseline
            past.append(np.array([bool(start) and spread.value / start >= c.update_ratio.max_spread_growth]))
        stat = "sqrt_v_rms" if "sqrt_v_rms" in stats else "grad_rms"
        if c.adam_eps.enabled and stat in stats:
            v = m[:, stats.index(stat)]
            past.append((v > 0) & (v <= self._eps(msg)))
        if any(rows.any() for rows in past):
            return True
        if c.log_z.enabled:
            values = [(n, msg.scalar(n)) for n in ("log_z_mean", "log_z_max") if n in msg.layout.scalars]
            if "log_z_max" in stats:
                values += zip(msg.layout.tensors, m[:, stats.index("log_z_max")].tolist(), strict=True)
            for layer, value in values:
                base = self.baselines.settled(("log_z", layer))
                if base is not None and abs(value - base) >= c.log_z.max_drift:
                    return True
        return False

    # helpers

    def _windows(self, series: SeriesHistory, stat: str, msg: StatsMessage) -> list[StatWindow]:
        """Windows of ``stat`` for the layout of this message only (other layouts were seen before)."""
        out = []
        for w in series.stat_windows(stat, self.cfg.trend.window):
            if w.tensors != msg.layout.tensors:
                continue
            seg = _current_segment(w.steps, self.cfg.trend.warmup_steps)
            if seg.stop - seg.start:
                out.append(StatWindow(w.tensors, w.steps[seg], w.values[seg].astype(np.float64)))
        return out

    def _scalar_window(self, series: SeriesHistory, name: str) -> StatWindow | None:
        steps, values = series.scalar(name, self.cfg.trend.window)
        if not len(steps):
            return None
        seg = _current_segment(steps, self.cfg.trend.warmup_steps)
        if not seg.stop - seg.start:
            return None
        return StatWindow((name,), steps[seg], values[seg, None].astype(np.float64))

    def _eta_risk(self, eta: float | None, crossed: bool) -> tuple[float | None, str | None, float]:
        t = self.cfg.trend
        if crossed:
            return 0.0, "critical", 1.0
        if eta is None or not math.isfinite(eta) or eta > t.max_eta_steps:
            return None, None, 0.0
        eta = max(0.0, eta)
        severity = "warning" if eta <= t.warn_eta_steps else None
        return eta, severity, max(0.0, 1.0 - eta / self.cfg.horizon_steps)

    def _fit_ok(self, t: float, n: float) -> bool:
        return n >= self.cfg.trend.min_points and t >= self.cfg.trend.min_t

    def _candidates(
        self,
        last_ok: np.ndarray,
        crossed: np.ndarray,
        slope: np.ndarray,
        gap: np.ndarray,
        n: np.ndarray,
        t: np.ndarray,
        also: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows that may give a forecast: usable now and past the limit, or with a fitted ETA
        (``gap / slope``) within ``max_eta_steps`` (or ``also``).  The per-row checks that follow
        decide; this only spares a Python loop over the (many) quiet rows of a large model."""
        tr = self.cfg.trend
        fitted = (slope > 0) & (n >= tr.min_points) & (t >= tr.min_t)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            eta = gap / np.where(fitted, slope, 1.0)
        keep = crossed | (fitted & np.isfinite(eta) & (eta <= tr.max_eta_steps))
        if also is not None:
            keep |= also
        return np.flatnonzero(last_ok & keep)

    def _baseline(self, predictor: str, layer: str, steps: np.ndarray, values: np.ndarray) -> float | None:
        """Early baseline of a row from the values not yet offered (each step offered once)."""
        key = (predictor, layer)
        settled = self.baselines.settled(key)
        if settled is not None:
            return settled
        seen = self._baseline_seen.get(key, -1)
        fresh = [v for s, v in zip(steps.tolist(), values.tolist()) if s > seen and math.isfinite(v)]
        if len(steps):
            self._baseline_seen[key] = max(seen, int(steps[-1]))
        return self.baselines.update(key, fresh)

    # predictors

    def _growth_up(
        self,
        predictor: str,
        stat: str,
        w: StatWindow,
        limit_log: np.ndarray,
        y: np.ndarray,
        ok: np.ndarray,
        describe,
        raw: np.ndarray | None = None,
    ) -> list[Forecast]:
        """Forecasts for rows of ``w`` whose log-scale value ``y`` rises towards ``limit_log``;
        ``raw`` (default ``w.values``) holds the values reported."""
        raw = w.values if raw is None else raw
        slope, at_last, r2, n, t = fit_lines(w.steps, y, ok)
        span = float(w.steps[-1] - w.steps[0]) if len(w.steps) > 1 else 0.0
        out = []
        for r in self._candidates(ok[-1], y[-1] >= limit_log, slope, (limit_log - at_last), n, t).tolist():
            crossed = bool(y[-1, r] >= limit_log[r])
            eta = None
            if not crossed and slope[r] > 0 and self._fit_ok(t[r], n[r]):
                eta = float((limit_log[r] - at_last[r]) / slope[r])
            eta, severity, risk = self._eta_risk(eta, crossed)
            if eta is None and not crossed:
                continue
            growth = math.exp(slope[r] * span) if span else 1.0
            evidence = {"slope_per_step": slope[r], "r2": r2[r], "t": t[r], "points": n[r], "span_steps": span,
                        "growth": growth}  # fmt: skip
            message = describe(r, growth, span, eta, crossed)
            out.append(
                Forecast(
                    predictor,
                    w.tensors[r],
                    stat,
                    float(raw[-1, r]),
                    int(w.steps[-1]),
                    eta,
                    severity,
                    risk,
                    message,
                    evidence,
                )
            )
        return out

    def _attn_logit(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        limit = self.cfg.attn_logit.limit
        out = []
        for w in self._windows(series, "attn_logit_max", msg):
            ok = np.isfinite(w.values) & (w.values > 0)
            y = self._logs["attn_logit"](w.steps, np.where(ok, w.values, 1.0))
            lim = np.full(y.shape[1], math.log(limit))

            def describe(r, growth, span, eta, crossed, w=w):
                v = w.values[-1, r]
                if crossed:
                    return (
                        f"attn_logit_max of {w.tensors[r]} is {v:.4g}, past {limit:g} (Wortsman: runs past 1e4 diverge)"
                    )
                return (
                    f"attn_logit_max of {w.tensors[r]} is {v:.4g}, rose {growth:.2f}× over {span:.0f} steps; "
                    f"ETA to {limit:g}: {eta:.0f} steps"
                )

            out += self._growth_up("attn_logit", "attn_logit_max", w, lim, y, ok, describe)
        return out

    def _out_rms(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        grow = self.cfg.out_rms.max_growth
        out = []
        for w in self._windows(series, "out_rms", msg):
            base = np.array(
                [self._baseline("out_rms", t, w.steps, w.values[:, r]) or np.nan for r, t in enumerate(w.tensors)]
            )
            self._out_rms_base[w.tensors] = base
            ok = np.isfinite(w.values) & (w.values > 0) & np.isfinite(base)[None, :] & (base > 0)[None, :]
            y = self._logs["out_rms"](w.steps, np.where(ok, w.values / np.where(base > 0, base, 1.0)[None, :], 1.0))
            lim = np.full(y.shape[1], math.log(grow))

            def describe(r, growth, span, eta, crossed, w=w, base=base):
                ratio = w.values[-1, r] / base[r]
                head = f"out_rms of {w.tensors[r]} is {ratio:.2f}× its early baseline {base[r]:.4g}"
                if crossed:
                    return f"{head} (limit {grow:g}×, Rybakov et al.)"
                return f"{head}, rose {growth:.2f}× over {span:.0f} steps; ETA to {grow:g}×: {eta:.0f} steps"

            out += self._growth_up("out_rms", "out_rms", w, lim, y, ok, describe)
        return out

    def _lr_at(self, series: SeriesHistory, steps: np.ndarray) -> np.ndarray | None:
        lr_steps, lr_values = series.scalar("lr", 4 * len(steps) + 16)
        if not len(lr_steps):
            return None
        table = dict(zip(lr_steps.tolist(), lr_values.tolist()))
        lr = np.array([table.get(s, np.nan) for s in steps.tolist()], dtype=np.float64)
        return lr if np.isfinite(lr[-1]) and lr[-1] > 0 else None

    def _excluded(self, tensors: tuple[str, ...]) -> np.ndarray:
        """Rows matching ``update_ratio.exclude``; cached for the latest layout (one string scan per
        row and pattern is the dearest part of a 1,000-tensor message otherwise).  Read-only."""
        pats = tuple(self.cfg.update_ratio.exclude)
        key = self._excluded_key
        if key is None or key[0] is not tensors or key[1] != pats:
            if key is None or key[1] != pats or key[0] != tensors:
                mask = np.array([any(p in t for p in pats) for t in tensors], dtype=bool)
                mask.flags.writeable = False
                self._excluded_mask = mask
            self._excluded_key = (tensors, pats)
        return self._excluded_mask

    def _update_ratio(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        limit = self.cfg.update_ratio.limit
        out = []
        for w in self._windows(series, "update_ratio", msg):
            lr = self._lr_at(series, w.steps)
            scale = lr if lr is not None else np.ones(len(w.steps))
            values = w.values / np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)[:, None]
            ok = np.isfinite(values) & (values > 0) & ~self._excluded(w.tensors)[None, :]
            y = self._logs["update_ratio"](w.steps, np.where(ok, values, 1.0))
            lim = np.full(y.shape[1], math.log(limit / scale[-1]))

            def describe(r, growth, span, eta, crossed, w=w):
                v = w.values[-1, r]
                if crossed:
                    return f"update_ratio of {w.tensors[r]} is {v:.3g}, past {limit:g}"
                return (
                    f"update_ratio of {w.tensors[r]} rose {growth:.1f}× over {span:.0f} steps; "
                    f"ETA to {limit:g}: {eta:.0f} steps (now {v:.3g})"
                )

            for f in self._growth_up("update_ratio", "update_ratio", w, lim, y, ok, describe):
                f.evidence["lr_normalised"] = lr is not None
                out.append(f)
        return out

    def _track_spread(self, msg: StatsMessage) -> Spread:
        """Append this message's update-ratio spread (max / median over the matrices) to its
        window, on every message."""
        col = msg.matrix[:, msg.layout.stats.index("update_ratio")]
        with np.errstate(invalid="ignore"):
            keep = (col > 0) & (col < np.inf) & ~self._excluded(msg.layout.tensors)
        vals = col[keep].astype(np.float64)
        if len(vals) < 4:
            return Spread(math.nan, None, len(vals))
        top = int(vals.argmax())
        spread = float(vals[top] / _median(vals))
        if self._spread and msg.step <= self._spread[-1][0]:
            self._spread.clear()  # a rollback: start the current timeline's window afresh
        self._spread.append((msg.step, spread, msg.layout.tensors[int(np.flatnonzero(keep)[top])]))
        return Spread(spread, self.baselines.update(("update_ratio_spread", ""), [spread]), len(vals))

    def _update_spread(self, tracked: Spread) -> list[Forecast]:
        spread, base, matrices = tracked
        if base is None or base <= 0 or not math.isfinite(spread):
            return []
        grow = self.cfg.update_ratio.max_spread_growth
        steps = np.array([s for s, _, _ in self._spread][-self.cfg.trend.window :])
        ys = np.log(np.array([v for _, v, _ in self._spread][-self.cfg.trend.window :]) / base)[:, None]
        w = StatWindow(("",), steps, ys)
        largest = self._spread[-1][2]

        def describe(r, growth, span, eta, crossed):
            head = (
                f"update_ratio spread (max/median over {matrices} matrices) is {spread:.3g}, "
                f"{spread / base:.2f}× its early value {base:.3g}; largest: {largest}"
            )
            return head if crossed else f"{head}; ETA to {grow:g}×: {eta:.0f} steps"

        raw = np.array([v for _, v, _ in self._spread][-self.cfg.trend.window :])[:, None]
        fc = self._growth_up("update_ratio_spread", "update_ratio", w, np.array([math.log(grow)]), ys,
                             np.isfinite(ys), describe, raw=raw)  # fmt: skip
        return [
            Forecast(
                f.predictor,
                largest,
                f.statistic,
                f.value,
                f.step,
                f.eta_steps,
                f.severity,
                f.risk,
                f.message,
                {**f.evidence, "baseline": base, "matrices": matrices},
            )  # fmt: skip
            for f in fc
        ]

    def _eps(self, msg: StatsMessage) -> float:
        """Adam's eps: the trainer's scalar ``adam_eps`` if it sends one, else ``adam_eps.eps``."""
        eps = msg.scalar("adam_eps")
        return eps if eps is not None and math.isfinite(eps) and eps > 0 else self.cfg.adam_eps.eps

    def _adam_eps(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        c = self.cfg.adam_eps
        eps = self._eps(msg)
        if eps <= 0:
            return []
        stat = "sqrt_v_rms" if "sqrt_v_rms" in msg.layout.stats else "grad_rms"
        out = []
        for w in self._windows(series, stat, msg):
            ok = np.isfinite(w.values) & (w.values > 0)
            y = -self._logs["adam_eps"](w.steps, np.where(ok, w.values, 1.0))  # falling value = rising -log
            lim = np.full(y.shape[1], -math.log(eps))
            slope, at_last, r2, n, t = fit_lines(w.steps, y, ok)
            span = float(w.steps[-1] - w.steps[0]) if len(w.steps) > 1 else 0.0
            last = w.values[-1]
            rows = self._candidates(ok[-1], last <= eps, slope, lim - at_last, n, t, also=last <= c.margin * eps)
            for r in rows.tolist():
                v = float(w.values[-1, r])
                crossed = v <= eps
                eta = None
                if not crossed and slope[r] > 0 and self._fit_ok(t[r], n[r]):
                    eta = float((lim[r] - at_last[r]) / slope[r])
                eta, severity, risk = self._eta_risk(eta, crossed)
                if severity is None and v <= c.margin * eps:
                    severity, risk = "warning", max(risk, 0.5)
                if severity is None and eta is None:
                    continue
                fall = math.exp(slope[r] * span) if span else 1.0
                message = f"{stat} of {w.tensors[r]} is {v:.3g}, {v / eps:.2f}× Adam eps {eps:g}"
                if crossed:
                    message += "; updates shrink (Wortsman §3.4)"
                elif eta is not None:
                    message += f", fell {fall:.2f}× over {span:.0f} steps; ETA to eps: {eta:.0f} steps"
                evidence = {"eps": eps, "slope_per_step": -slope[r], "t": t[r], "points": n[r], "margin": c.margin}
                out.append(
                    Forecast(
                        "adam_eps", w.tensors[r], stat, v, int(w.steps[-1]), eta, severity, risk, message, evidence
                    )
                )
        return out

    def _log_z(self, msg: StatsMessage, series: SeriesHistory) -> list[Forecast]:
        limit = self.cfg.log_z.max_drift
        windows = self._windows(series, "log_z_max", msg) if "log_z_max" in msg.layout.stats else []
        for name in ("log_z_mean", "log_z_max"):
            if name in msg.layout.scalars:
                w = self._scalar_window(series, name)
                if w is not None:
                    windows.append(w)
        out = []
        for w in windows:
            for r, layer in enumerate(w.tensors):
                base = self._baseline("log_z", layer, w.steps, w.values[:, r])
                if base is None:
                    continue
                drift = w.values[:, r] - base
                ok = np.isfinite(drift)
                if not ok[-1]:
                    continue
                sign = 1.0 if drift[-1] >= 0 else -1.0
                y = (sign * drift)[:, None]
                slope, at_last, r2, n, t = fit_lines(w.steps, y, ok[:, None])
                crossed = bool(y[-1, 0] >= limit)
                eta = None
                if not crossed and slope[0] > 0 and self._fit_ok(t[0], n[0]):
                    eta = float((limit - at_last[0]) / slope[0])
                eta, severity, risk = self._eta_risk(eta, crossed)
                if eta is None and not crossed:
                    continue
                v = float(w.values[-1, r])
                message = f"log Z ({layer}) is {v:.3g}, drifted {drift[-1]:+.3g} from its early value {base:.3g}"
                message += f" (limit ±{limit:g})" if crossed else f"; ETA to ±{limit:g}: {eta:.0f} steps"
                evidence = {"baseline": base, "drift": float(drift[-1]), "slope_per_step": sign * slope[0], "t": t[0]}
                stat = layer if layer in ("log_z_mean", "log_z_max") and len(w.tensors) == 1 else "log_z_max"
                out.append(Forecast("log_z", layer, stat, v, int(w.steps[-1]), eta, severity, risk, message, evidence))
        return out


# -- one run/rank --------------------------------------------------------------------------------


class SeriesPredictor:
    """Spike detectors and trend predictors of one (run, rank), with their episode state."""

    def __init__(self, run: str, rank: int, cfg: PredictConfig):
        self.run, self.rank, self.cfg = run, rank, cfg
        self.spikes = {
            "loss": SpikeDetector("loss_spike", "loss", cfg.loss),
            "grad_norm": SpikeDetector("grad_norm_spike", "grad_norm", cfg.grad_norm),
        }
        self.trends = TrendPredictors(cfg)
        self.forecasts: dict[tuple[str, str], Forecast] = {}
        self.last_detection: dict[str, Detection] = {}
        self._trend_level: dict[tuple[str, str], int] = {}
        self._nonfinite: set[str] = set()
        self.step = -1
        self.version = 0  # bumped when the forecasts or detections change: with the step, all risk() reads

    def observe(self, msg: StatsMessage, series: SeriesHistory) -> list[Detection]:
        self.step = msg.step
        found = self._nonfinite_check(msg)
        for name, det in self.spikes.items():
            value = msg.scalar(name)
            if value is None or not math.isfinite(value) or not det.cfg.enabled:
                continue
            d = det.update(self.run, self.rank, msg.step, value)
            if d is not None:
                found.append(d)
        if msg.matrix.size or {"log_z_mean", "log_z_max"} & set(msg.layout.scalars):
            forecasts = self.trends.update(msg, series)
            if forecasts is not None:
                found += self._trend_detections(forecasts)
                self.version += 1
        for d in found:
            self.last_detection[d.detector] = d
        self.version += bool(found)
        return found

    def risk_settled(self) -> bool:
        """Whether ``risk()`` stays as it is until ``version`` changes (no detection still decaying)."""
        decay = self.cfg.detection_decay_steps
        return all(self.step - d.step >= decay for d in self.last_detection.values())

    def _nonfinite_check(self, msg: StatsMessage) -> list[Detection]:
        out = []
        bad_now = set()
        for name in ("loss", "grad_norm"):
            v = msg.scalar(name)
            if v is not None and not math.isfinite(v):
                bad_now.add(name)
                if name not in self._nonfinite:
                    out.append(
                        Detection(
                            self.run,
                            self.rank,
                            msg.step,
                            "nonfinite",
                            "critical",
                            name,
                            v,
                            f"{name} is {v} at step {msg.step}",
                            evidence={"value": v},
                        )
                    )
        others = [n for n in msg.layout.scalars if n not in ("loss", "grad_norm") and not math.isfinite(msg.scalar(n))]
        if not np.isfinite(msg.matrix).all():
            rows, cols = np.nonzero(~np.isfinite(msg.matrix))
            others += [
                f"{msg.layout.tensors[r]}/{msg.layout.stats[c]}" for r, c in zip(rows[:5].tolist(), cols[:5].tolist())
            ]
        if others:
            bad_now.add("*")
            if "*" not in self._nonfinite and not (bad_now & {"loss", "grad_norm"}):
                out.append(
                    Detection(
                        self.run,
                        self.rank,
                        msg.step,
                        "nonfinite",
                        "warning",
                        others[0],
                        math.nan,
                        f"non-finite statistics at step {msg.step}: {', '.join(others[:5])}",
                        evidence={"names": others[:5]},
                    )
                )
        self._nonfinite = bad_now
        return out

    def _trend_detections(self, forecasts: list[Forecast]) -> list[Detection]:
        out = []
        touched = {f.predictor for f in forecasts}
        for key in [k for k in self.forecasts if k[0] in touched]:
            del self.forecasts[key]
        for f in forecasts:
            key = (f.predictor, f.layer)
            self.forecasts[key] = f
            level = severity_rank(f.severity)
            if level > self._trend_level.get(key, 0):
                out.append(
                    Detection(
                        self.run,
                        self.rank,
                        f.step,
                        f.predictor,
                        f.severity,
                        f.statistic,
                        f.value,
                        f.message,
                        layer=f.layer,
                        eta_steps=f.eta_steps,
                        evidence={**f.evidence, "risk": f.risk},
                    )
                )
            self._trend_level[key] = level
        for key in [k for k in self._trend_level if k[0] in touched and k not in self.forecasts]:
            del self._trend_level[key]
        return out

    def rewind(self, to_step: int) -> None:
        for det in self.spikes.values():
            det.rewind(to_step)
        self.trends.rewind()
        self.version += 1
        self.forecasts.clear()
        self._trend_level.clear()
        self._nonfinite.clear()

    def etas(self) -> dict[str, float]:
        """Smallest ETA per trend predictor."""
        out: dict[str, float] = {}
        for (pred, _), f in self.forecasts.items():
            if f.eta_steps is not None:
                out[pred] = min(out.get(pred, math.inf), f.eta_steps)
        return out

    def top_forecasts(self) -> dict[str, Forecast]:
        """The riskiest forecast per trend predictor."""
        out: dict[str, Forecast] = {}
        for (pred, _), f in self.forecasts.items():
            if pred not in out or f.risk > out[pred].risk:
                out[pred] = f
        return out

    def risk(self) -> Risk:
        best = Risk(0.0, "no risk detected")
        for d in self.last_detection.values():
            weight = 1.0 if d.severity == "critical" else 0.5
            age = max(0, self.step - d.step) if self.step >= d.step else 0
            score = weight * max(0.0, 1.0 - age / self.cfg.detection_decay_steps)
            if score > best.score:
                best = Risk(score, f"{d.detector}: {d.message}", d.detector, d.layer)
        for f in self.forecasts.values():
            if f.risk > best.score:
                best = Risk(f.risk, f"{f.predictor}: {f.message}", f.predictor, f.layer)
        return Risk(round(min(1.0, best.score), 4), best.explanation, best.predictor, best.layer)
