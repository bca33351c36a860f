"""Per-layer forward probes (docs/probes.md): activation statistics on sampled steps."""

from sentinel.probes.hooks import BOUND_STATS, GROUP_STATS, HEAD_SCALARS, Probes, top_head_stats
from sentinel.probes.plan import ProbePlan, make_plan

__all__ = ["BOUND_STATS", "GROUP_STATS", "HEAD_SCALARS", "ProbePlan", "Probes", "make_plan", "top_head_stats"]
