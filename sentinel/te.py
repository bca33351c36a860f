"""Transformer Engine support: FP8 weight-cache refresh and TE's debug statistics.

Transformer Engine is imported lazily (it needs CUDA); everything here is inert without it.

**FP8 weight cache.** A TE module (``te.Linear``, ``LayerNormLinear``, ``LayerNormMLP``, and the
ones built from them) casts its weights to FP8 on a forward whose ``is_first_microbatch`` is
None or True, and with ``False`` reuses the copy it cached; that is how gradient-accumulation
loops skip the re-cast.  Statistics read the high-precision master weights, which is what the
optimizer holds.  When sentinel writes weights outside the optimizer's own update -- a rollback
restoring a checkpoint, WeSaR's or ``stabilise.init``'s re-initialisation, WeSaR's rescaling and
the clamp after a step -- a cached copy would be stale.  :class:`Fp8CacheRefresh` puts a forward
pre-hook on every TE module that takes ``is_first_microbatch``; after any such write, the next
forward of each module runs with ``is_first_microbatch=True`` (a user's None is left alone: it
re-casts anyway).  The forced value is logged once per write.

**Debug statistics.** With NVIDIA's ``nvdlfw_inspect`` enabled (TE's ``LogTensorStats`` /
``LogFp8TensorStats`` features), pass ``sentinel.te.statistics_logger(sn)`` as
``debug_api.initialize(..., statistics_logger=...)``: every value it logs (FP8 underflows and
overflows, amax, dynamic range...) goes out with the next ``sn.observe()`` as a statistics
message whose rows are ``<layer>.<tensor>`` and whose statistics are ``te_<stat>``, so it
reaches Prometheus as ``sentinel_param_te_<stat>`` beside everything else.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from sentinel_contract.protocol import Layout

log = logging.getLogger("sentinel")

TE_TENSORS = ("activation", "gradient", "weight", "output", "wgrad", "dgrad")
_NAME = re.compile(rf"^(?P<layer>.+)_(?P<tensor>{'|'.join(TE_TENSORS)})_(?P<stat>[^_].*)$")


def is_te_module(module: torch.nn.Module) -> bool:
    """A Transformer Engine PyTorch module (by its class's module path; TE need not be importable)."""
    return type(module).__module__.startswith("transformer_engine.pytorch")


def takes_first_microbatch(module: torch.nn.Module) -> bool:
    try:
        return "is_first_microbatch" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class Fp8CacheRefresh:
    """Forces ``is_first_microbatch=True`` on the next forward of each cached-weight module after a write."""

    def __init__(self, model: torch.nn.Module, select: Callable[[torch.nn.Module], bool] = is_te_module):
        self.modules = [m for m in model.modules() if select(m) and takes_first_microbatch(m)]
        self._stale: set[int] = set()
        self._reason = ""
        self.forced = 0
        self._hooks = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]

    def mark_stale(self, reason: str) -> None:
        """Sentinel wrote weights (``reason``): every module re-casts on its next forward."""
        if self.modules:
            self._stale = {id(m) for m in self.modules}
            self._reason = reason

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if id(module) not in self._stale:
            return None
        self._stale.discard(id(module))
        params = list(inspect.signature(module.forward).parameters)
        pos = params.index("is_first_microbatch")
        if len(args) > pos:
            if args[pos] is not False:
                return None
            args = (*args[:pos], True, *args[pos + 1 :])
        elif kwargs.get("is_first_microbatch") is False:
            kwargs = {**kwargs, "is_first_microbatch": True}
        else:
            return None
        self.forced += 1
        if not self._stale:
            log.info("sentinel te: FP8 weight copies re-cast after %s (is_first_microbatch forced True)", self._reason)
        return args, kwargs

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def split_stat_name(name: str) -> tuple[str, str]:
    """``"<layer>_<tensor>_<stat>"`` as TE logs it -> (``"<layer>.<tensor>"``, ``"te_<stat>"``)."""
    m = _NAME.match(name)
    row, stat = (f"{m['layer']}.{m['tensor']}", m["stat"]) if m else ("te", name)
    stat = re.sub(r"[^a-z0-9]+", "_", stat.lower().replace("%", "_pct")).strip("_") or "value"
    return row, f"te_{stat}"


class DebugStats:
    """Latest value of every (row, statistic) TE logged since the last collect; bounded."""

    def __init__(self, max_rows: int = 4096, max_stats: int = 64):
        self.max_rows, self.max_stats = max_rows, max_stats
        self._values: dict[str, dict[str, float]] = {}
        self.dropped = 0

    def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
        row, stat = split_stat_name(name)
        values = self._values.get(row)
        if values is None and len(self._values) >= self.max_rows:
            return self._drop(name, f"{self.max_rows} rows")
        if values is not None and stat not in values and len(values) >= self.max_stats:
            return self._drop(name, f"{self.max_stats} statistics in row {row}")
        if values is None:
            values = self._values[row] = {}
        values[stat] = float(value.item() if isinstance(value, torch.Tensor) else value)

    def _drop(self, name: str, limit: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10_000 == 0:
            log.warning(
                "sentinel te: debug statistic %s dropped: over %s (%d dropped so far)", name, limit, self.dropped
            )

    def collect(self) -> list[tuple[Layout, torch.Tensor]]:
        """One (layout, packed float32 matrix) for what was logged, then empty; [] if nothing was."""
        if not self._values:
            return []
        rows = tuple(sorted(self._values))
        stats = tuple(sorted({s for v in self._values.values() for s in v}))
        matrix = torch.tensor(
            [[self._values[r].get(s, math.nan) for s in stats] for r in rows], dtype=torch.float32
        ).reshape(-1)
        self._values = {}
        return [(Layout(scalars=(), stats=stats, tensors=rows), matrix)]


def statistics_logger(sn: Any) -> Any:
    """A ``nvdlfw_inspect`` statistics logger feeding ``sn``'s channel; raises ImportError without it."""
    try:
        from nvdlfw_inspect.logging import BaseLogger
    except ImportError as exc:
        raise ImportError(
            "sentinel.te.statistics_logger needs nvdlfw_inspect (pip install nvdlfw-inspect, or "
            "llm-sentinel[te] which brings Transformer Engine and it)"
        ) from exc

    stats = DebugStats()

    class SentinelStatisticsLogger(BaseLogger):
        def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
            stats.log_scalar(name, value, iteration, **kwargs)

    sn.add_source(stats.collect)
    return SentinelStatisticsLogger()
