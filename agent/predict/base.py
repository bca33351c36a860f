"""What every predictor shares: its results, and the small interface the table lists.

A predictor reads the statistics of one run/rank, message by message, and says what it sees:

* an **event** predictor (``kind = "event"``: NaN/Inf, loss and gradient-norm spikes) returns
  ``Detection``s, one per episode;
* a **trend** predictor (``kind = "trend"``) returns its current ``Forecast``s, one per layer it
  has a view on, or None when it kept its last ones (agent/predict/trend.py).  The series
  turns a forecast into a detection when its severity rises (agent/predict/series.py).

A new predictor is one module with one ``Predictor`` subclass (its ``name``, its config section
``key`` and ``Config`` dataclass, ``wants`` and ``update``) and one entry in
``agent.predict.registry.PREDICTORS``; its detector name, config section and policy rules follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from agent.events import plain
from sentinel_contract.protocol import StatsMessage

if TYPE_CHECKING:
    from agent.history import SeriesHistory

SEVERITIES = ("warning", "critical")


def severity_rank(severity: str | None) -> int:
    return 0 if severity is None else SEVERITIES.index(severity) + 1


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
    """A trend predictor's view of one layer at its latest point.

    ``evidence["curve"]`` holds what an operator needs to judge it at a glance: the points the
    line was fitted on (in the statistic's own units), the fitted line and the limit it heads to
    (``trend.curve``).
    """

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

    def detection(self, run: str, rank: int) -> Detection:
        return Detection(run, rank, self.step, self.predictor, self.severity or "warning", self.statistic,
                         self.value, self.message, layer=self.layer, eta_steps=self.eta_steps,
                         evidence={**self.evidence, "risk": self.risk})  # fmt: skip


@dataclass(frozen=True)
class Risk:
    score: float
    explanation: str
    predictor: str | None = None
    layer: str | None = None


class Predictor:
    """One predictor of one run/rank; subclasses set the class attributes and ``update``."""

    name: ClassVar[str]  # detector name: events, metrics and policy rules use it
    key: ClassVar[str]  # its section under `predict:` in agent.yaml
    Config: ClassVar[type]  # that section's dataclass (with an `enabled` field)
    kind: ClassVar[str] = "trend"  # "event": update returns Detections; "trend": Forecasts or None

    def __init__(self, cfg: Any, run: str = "", rank: int = 0):
        self.cfg, self.run, self.rank = cfg, run, rank
        self.c = getattr(cfg, self.key)

    @property
    def enabled(self) -> bool:
        return bool(self.c.enabled)

    def wants(self, msg: StatsMessage) -> bool:
        """Whether this message carries what the predictor reads."""
        raise NotImplementedError

    def update(self, msg: StatsMessage, series: SeriesHistory) -> list | None:
        raise NotImplementedError

    def rewind(self, to_step: int) -> None:
        """The trainer went back to ``to_step``: forget what came after."""
