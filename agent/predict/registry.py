"""The table of predictors: one entry per predictor, in the order they run on a message.

The detector names (events, metrics, policy rules) and the sections of ``predict:`` in agent.yaml
are derived from it; adding a predictor is its module plus one line here.
"""

from __future__ import annotations

from agent.predict.adam_eps import AdamEps
from agent.predict.attn_logit import AttnLogit
from agent.predict.base import Predictor
from agent.predict.integrity import Integrity
from agent.predict.log_z import LogZ
from agent.predict.nonfinite import Nonfinite
from agent.predict.out_rms import OutRms
from agent.predict.spike import GradNormSpike, LossSpike
from agent.predict.update_ratio import UpdateRatio
from agent.predict.update_spread import UpdateSpread

PREDICTORS: tuple[type[Predictor], ...] = (
    Nonfinite,
    LossSpike,
    GradNormSpike,
    Integrity,
    AttnLogit,
    OutRms,
    UpdateRatio,
    UpdateSpread,
    AdamEps,
    LogZ,
)
DETECTORS: tuple[str, ...] = tuple(p.name for p in PREDICTORS)
TREND_PREDICTORS: tuple[str, ...] = tuple(p.name for p in PREDICTORS if p.kind == "trend")
