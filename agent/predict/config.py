"""``predict:`` in agent.yaml: the options every predictor shares, and one section per predictor of
the table (``registry.PREDICTORS``), each the predictor's own ``Config`` dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from agent.predict.registry import PREDICTORS
from agent.predict.trend import TrendConfig
from sentinel_contract.typedconfig import option


@dataclasses.dataclass
class _Common:
    enabled: bool = option(True, doc="Run the predictors (and so the policy).")
    ranks: str = option(
        "zero",
        choices=("zero", "all"),
        doc="Ranks whose statistics feed the predictors and the recording: rank 0 only, or every rank.",
    )
    horizon_steps: int = option(
        1000, range=(1, 100_000_000), doc="A forecast's risk falls to 0 at this ETA (0.5 at `trend.warn_eta_steps`)."
    )
    detection_decay_steps: int = option(
        100, range=(1, 100_000_000), doc="Steps over which a detection's contribution to the risk decays to 0."
    )
    trend: TrendConfig = option(TrendConfig, doc="What every trend predictor shares (agent/predict/trend.py).")


PredictConfig = dataclasses.make_dataclass(
    "PredictConfig",
    [(p.key, p.Config, field(default_factory=p.Config)) for p in PREDICTORS],
    bases=(_Common,),
)
PredictConfig.__module__ = __name__
PredictConfig.__doc__ = "Agent predictors (docs/policy.md, 'Predictors')."
