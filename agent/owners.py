"""A run belongs to the CURVE key that opened it.

CURVE proves which key a peer holds, not which run it trains: any admitted trainer could say
``hello`` for another run's name (and receive its rollback), ack that run's commands (and write
a false ``applied`` into the audit trail) or push statistics under its name (and trigger real
actions on it).  So the first key to speak for a run name, on either channel, owns it for the
life of this agent process; the same name from another key is refused, counted by reason
(``sentinel_agent_refused_total{reason}``) and logged with both keys.  A restarted trainer
holds the same key and carries on where it left off.  Peers of a channel served without CURVE
(``security.insecure``) carry no key: nothing can be checked for them, which docs/security.md
spells out.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from agent.receive import RateLimiter

logger = logging.getLogger("sentinel.agent")

REASONS = ("statistics_from_another_key", "hello_from_another_key", "ack_from_another_key", "ack_for_another_run")
MAX_RUNS = 100_000


class RunOwners:
    """Run name -> the z85 public key that opened it; thread-safe (both channels' threads use it)."""

    def __init__(self, limiter: RateLimiter | None = None, max_runs: int = MAX_RUNS):
        from agent.receive import RateLimiter  # agent.receive imports this module

        self._owners: OrderedDict[str, str] = OrderedDict()
        self._refused = dict.fromkeys(REASONS, 0)
        self._lock = threading.Lock()
        self.max_runs = max_runs
        self.limiter = limiter or RateLimiter()

    def owner(self, run: str) -> str | None:
        with self._lock:
            return self._owners.get(run)

    def admit(self, run: str, key: str | None, reason: str) -> bool:
        """True if ``key`` may speak for ``run`` (claiming it if nobody has); else counted under ``reason``.

        ``key`` None: a peer of an unauthenticated channel, admitted (there is nothing to compare).
        """
        if key is None:
            return True
        from agent.receive import clean

        with self._lock:
            owner = self._owners.get(run)
            if owner is None:
                self._owners[run] = key
                while len(self._owners) > self.max_runs:
                    self._owners.popitem(last=False)
                claimed = True
            elif owner == key:
                self._owners.move_to_end(run)
                return True
            else:
                self._refused[reason] += 1
                claimed = False
        if claimed:
            logger.info("run %s belongs to CURVE key %s (its first peer)", clean(run), key)
            return True
        self.refuse_log(reason, f"run {clean(run)} belongs to CURVE key {owner}, this peer holds {key}")
        return False

    def refuse(self, reason: str, detail: str) -> None:
        """Count (and log, rate limited) a refusal decided elsewhere."""
        with self._lock:
            self._refused[reason] += 1
        self.refuse_log(reason, detail)

    def refuse_log(self, reason: str, detail: str) -> None:
        if self.limiter.allow("refused_" + reason):
            logger.warning("refused (%s): %s", reason, detail)

    @property
    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "sentinel_agent_refused",
            "Messages refused because their CURVE key does not own the run they name (messages).",
            labels=["reason"],
        )
        for reason, n in self.refused.items():
            family.add_metric([reason], n)
        return [family]


def peer_key(frame: object) -> str | None:
    """The z85 CURVE public key the ZAP handler gave a received frame (``User-Id``), or None without CURVE."""
    try:
        key = frame.get("User-Id")  # type: ignore[attr-defined]
    except Exception:  # zmq.ZMQError EINVAL: no metadata (no security mechanism)
        return None
    return key if isinstance(key, str) and len(key) == 40 else None
