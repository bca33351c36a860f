"""The agent's shared state: history plus its own counters, behind one lock.

The receiver thread writes it, the /metrics handler threads read it; the supervisor counts
the policy's decisions here.  Readers take a ``snapshot()`` (copies made under the lock) and
do their slow work, such as formatting metrics, after releasing it, so a scrape never
holds up the receiver for longer than the copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.history import History, PushResult, SeriesSnapshot
from sentinel_contract.protocol import REJECT_REASONS, StatsMessage


@dataclass(frozen=True)
class AgentSnapshot:
    received_messages: int
    rejected_messages: dict[str, int]
    decisions: int
    series: list[SeriesSnapshot]
    history_bytes: int


class AgentState:
    """Counters and history; every method takes the lock itself."""

    def __init__(self, config: AgentConfig):
        self.lock = threading.Lock()
        self.history = History.from_config(config)
        self.received_messages = 0
        self.rejected_messages = dict.fromkeys(REJECT_REASONS, 0)
        self.decisions = 0

    def record_message(self, msg: StatsMessage, received_at: float) -> PushResult:
        """Count an accepted message and add it to the history."""
        with self.lock:
            self.received_messages += 1
            return self.history.push(msg, received_at)

    def record_reject(self, reason: str) -> None:
        """Count a message rejected for ``reason`` (one of protocol.REJECT_REASONS)."""
        if reason not in self.rejected_messages:
            raise ValueError(f"unknown reject reason {reason!r}")
        with self.lock:
            self.received_messages += 1
            self.rejected_messages[reason] += 1

    def record_decision(self, n: int = 1) -> None:
        """Count decisions taken by the agent's policy (agent/supervisor.py)."""
        if n < 0:
            raise ValueError("decisions can only be added")
        with self.lock:
            self.decisions += n

    def snapshot(self, matrices: str = "all") -> AgentSnapshot:
        """``matrices="lowest"``: copy the matrices of the lowest rank of each run only (what /metrics
        exports with ``export.tensor_ranks: lowest``), not those of a thousand other ranks."""
        with self.lock:
            keep = None
            if matrices == "lowest":
                lowest: dict[str, int] = {}
                for s in self.history:
                    if s.layouts and s.rank < lowest.get(s.run, s.rank + 1):
                        lowest[s.run] = s.rank
                keep = set(lowest.items())
            return AgentSnapshot(
                received_messages=self.received_messages,
                rejected_messages=dict(self.rejected_messages),
                decisions=self.decisions,
                series=[s.snapshot(matrices=keep is None or (s.run, s.rank) in keep) for s in self.history],
                history_bytes=self.history.nbytes,
            )
