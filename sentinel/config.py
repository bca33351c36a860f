"""Trainer-side configuration: a typed dataclass tree loaded from YAML or a dict.

Every key is documented in docs/configuration.md (generated from the ``doc=`` strings here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.typedconfig import ConfigError, load, option, reference_markdown

__all__ = ["Config", "ConfigError", "StatsConfig", "PublishConfig", "load_config"]


@dataclass
class StatsConfig:
    enabled: bool = option(True, doc="Compute per-tensor statistics after optimizer steps.")
    every: int = option(1, range=(1, None), doc="Compute statistics every N steps (step % N == 0).")
    update: str = option(
        "auto",
        choices=("auto", "reconstruct", "copy", "off"),
        doc=(
            "How the update dW is measured. 'reconstruct' rebuilds it from Adam/AdamW state (no extra "
            "memory beyond a bounded scratch buffer); 'copy' keeps a copy of the parameters from before "
            "the step on statistics steps (1x parameter memory); 'auto' reconstructs for Adam/AdamW "
            "and copies otherwise; 'off' skips update statistics."
        ),
    )
    chunk_elements: int = option(
        1 << 25,
        range=(1 << 10, None),
        doc="Largest number of elements processed in one batched (foreach) reduction; bounds scratch memory.",
    )


@dataclass
class PublishConfig:
    enabled: bool = option(True, doc="Send statistics to the agent over ZeroMQ.")
    endpoint: str = option("tcp://127.0.0.1:5557", doc="ZeroMQ endpoint of the agent's statistics socket.")
    queue: int = option(
        1000, range=(1, 1_000_000), doc="Messages buffered while the agent is slow; beyond this they drop."
    )
    ranks: str = option("zero", choices=("zero", "all"), doc="Which ranks publish: rank 0 only, or every rank.")


@dataclass
class Config:
    enabled: bool = option(True, doc="Master switch: false installs no hooks and publishes nothing.")
    run: str | None = option(
        None, doc="Run name used as the `run` label; default: $SENTINEL_RUN or 'run-<host>-<pid>'."
    )
    log_level: str = option(
        "info", choices=("debug", "info", "warning", "error"), doc="Level of the 'sentinel' logger."
    )
    stats: StatsConfig = field(default_factory=StatsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


def load_config(source: str | Path | dict | Config | None = None, **overrides: Any) -> Config:
    """Load a Config from a YAML path, dict or Config; keyword overrides may use dotted keys."""
    return load(Config, source, **overrides)


if __name__ == "__main__":
    print(reference_markdown(Config), end="")
