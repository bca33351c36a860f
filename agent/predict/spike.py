"""Spike detectors on the ``loss`` and ``grad_norm`` scalars (docs/policy.md, "Spike detectors").

A value is an outlier when its robust z-score against a rolling window (median and MAD, scaled
by 1.4826 to estimate σ) or an EMA (ZClip's α = 0.97) reaches ``z`` *and* it is at least
``min_ratio`` times the window's centre; it is critical at ``critical_ratio`` times.  The
defaults sit between the peers: the window of 128 is OLMo-core's, z = 6 its 6σ (a MAD-based σ
does not grow with the spike it is meant to catch), and the ratios echo llm-foundry's 2× and
Megatron-LM's 10×.  Outliers never enter the window, so a spike cannot raise the bar for the next
one; after ``rebaseline_after`` consecutive outliers the level is taken as the new normal.  The
gradient norm is the pre-clip one the trainer measures during backward, so an excursion that
clipping would hide is seen (BLOOM-176B's grew from 0.24 to 960 before its loss spike).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from agent.predict.base import Detection, Predictor, severity_rank
from agent.predict.fit import median as _median
from sentinel_contract.protocol import StatsMessage
from sentinel_contract.typedconfig import option

logger = logging.getLogger("sentinel.agent")
MAD_TO_SIGMA = 1.4826


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
    min_consecutive: int = option(
        1, range=(1, 10_000), doc="Consecutive outliers before a detection (1: the first outlier is one)."
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
    min_consecutive: int = option(
        2,
        range=(1, 10_000),
        doc="Consecutive outliers before a detection: single-step gradient spikes (3-470× in the zoo's healthy "
        "runs, the loss unmoved) are routine at small batch sizes and are the in-step guard's to skip.",
    )


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
        if len(self.outliers) < self.cfg.min_consecutive:
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
            "consecutive": len(self.outliers),
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


class _ScalarSpike(Predictor):
    """One spike detector on one scalar; on the job-level maximum over ranks when the message has it.

    Under torch.distributed rank 0 also sends ``<statistic>_max`` and ``<statistic>_max_rank``
    (sentinel/rank_reduce.py): scoring the maximum sees a spike on any one rank (the mean would
    divide it by the number of ranks), and the detection names the rank it came from.
    """

    kind = "event"
    statistic: str
    job_level: bool = False

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self.detector = SpikeDetector(self.name, self.statistic, self.c)

    def _source(self, msg: StatsMessage) -> str:
        job = self.statistic + "_max"
        return job if self.job_level and job in msg.layout.scalars else self.statistic

    def wants(self, msg: StatsMessage) -> bool:
        return self._source(msg) in msg.layout.scalars

    def update(self, msg: StatsMessage, series) -> list[Detection]:
        source = self._source(msg)
        value = msg.scalar(source)
        if value is None or not math.isfinite(value):
            return []
        d = self.detector.update(self.run, self.rank, msg.step, value)
        if d is None:
            return []
        if source != self.statistic:
            r = msg.scalar(source + "_rank")
            r = int(r) if r is not None and math.isfinite(r) else None
            text = f"{self.statistic} of rank {r} (the largest over ranks)" if r is not None else source
            d = replace(d, message=text + d.message[len(self.statistic) :],
                        evidence={**d.evidence, "rank": r, "statistic": source})  # fmt: skip
        return [d]

    def rewind(self, to_step: int) -> None:
        self.detector.rewind(to_step)


class LossSpike(_ScalarSpike):
    name, key, Config, statistic = "loss_spike", "loss", SpikeConfig, "loss"
    job_level = True


class GradNormSpike(_ScalarSpike):
    name, key, Config, statistic = "grad_norm_spike", "grad_norm", GradNormSpikeConfig, "grad_norm"
