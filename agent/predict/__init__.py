"""Predictors: what the agent concludes from the statistics of one run/rank (docs/policy.md).

One module per predictor behind one interface (``base.Predictor``), listed in one table
(``registry.PREDICTORS``) from which the detector names and the ``predict:`` config sections are
derived; ``series.SeriesPredictor`` runs them for one run/rank and keeps the episodes and the risk.
"""

from agent.predict.base import SEVERITIES, Detection, Forecast, Predictor, Risk, severity_rank
from agent.predict.config import PredictConfig
from agent.predict.fit import fit_lines
from agent.predict.registry import DETECTORS, PREDICTORS, TREND_PREDICTORS
from agent.predict.series import SeriesPredictor
from agent.predict.trend import TrendConfig

__all__ = [
    "DETECTORS",
    "PREDICTORS",
    "SEVERITIES",
    "TREND_PREDICTORS",
    "Detection",
    "Forecast",
    "PredictConfig",
    "Predictor",
    "Risk",
    "SeriesPredictor",
    "TrendConfig",
    "fit_lines",
    "severity_rank",
]
