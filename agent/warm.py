"""Warm start: after a restart, rebuild history and detector state from the recordings.

A freshly started predictor is blind for its warm-up (``predict.*.warmup`` values, 64 by
default), so an agent killed and restarted mid-run would miss a spike in the steps that
follow.  The recordings (agent/recording.py) already hold every accepted message, so on start
the tail of each recent run's recording, at most ``history.steps`` messages, goes through
the same history and predictors with ``act=False``: state only, no decision, no count, no
event.  Decisions already taken come back separately from events.jsonl (Supervisor.restore),
so nothing already acted on is decided again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from agent.recording import Recorded, RecordingError, read_recording, rotation_sets
from agent.state import AgentState
from agent.supervisor import Supervisor

logger = logging.getLogger("sentinel.agent")


def recording_sets(directory: Path, max_age_seconds: float, now: float | None = None) -> dict[str, list[Path]]:
    """Recording files per file stem, oldest first, for stems whose newest file changed within the age limit."""
    now = time.time() if now is None else now
    found = directory.glob("stats-*.jsonl") if directory.is_dir() else ()
    out = {}
    for (_, stem), files in rotation_sets(found).items():
        try:
            fresh = now - files[-1].stat().st_mtime <= max_age_seconds
        except OSError:
            continue
        if fresh:
            out[stem] = files
    return out


def warm_start(
    state: AgentState, supervisor: Supervisor, directory: Path, *, steps: int, max_age_seconds: float
) -> tuple[int, int]:
    """Replay the tail of each recent recording into ``state`` and ``supervisor``; (runs, messages).

    Never raises for a bad file: it is logged and skipped, and the agent starts cold for that run.
    """
    runs = messages = 0
    started = time.monotonic()
    for stem, paths in recording_sets(directory, max_age_seconds).items():
        tail: deque[Recorded] = deque(maxlen=steps)
        skipped: list[str] = []
        try:
            tail.extend(read_recording(paths, skipped=skipped))
        except (OSError, RecordingError) as exc:
            logger.warning("warm start: %s skipped (%s)", stem, exc)
            continue
        if skipped:
            logger.warning("warm start: %d unreadable line(s) in %s, e.g. %s", len(skipped), stem, skipped[0])
        for rec in tail:
            msg = rec.message
            with state.lock:
                pushed = state.history.push(msg, rec.received_at)
            supervisor.observe(msg, pushed.series, act=False)
            messages += 1
        runs += bool(tail)
    if runs:
        logger.info(
            "warm start: %d message(s) of %d run(s) from the recordings in %s (%.1f s)",
            messages,
            runs,
            directory,
            time.monotonic() - started,
        )
    return runs, messages
