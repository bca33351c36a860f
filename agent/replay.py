"""Offline replay: a recording through the predictors and the policy, with no socket opened.

``sentinel-agent replay stats-<run>.jsonl`` answers "what would the agent have done on this
run (with this configuration)?": it feeds every recorded message, in order, to the same
``History`` and ``Supervisor`` the live agent uses, with the recorded receive times as the
clock, and returns the decisions.  Rotated files can be given oldest first.  Nothing is
written unless an events file is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import AgentConfig
from agent.events import EventLog
from agent.history import History
from agent.policy import Decision, describe_actions
from agent.recording import read_recording
from agent.supervisor import Supervisor


@dataclass
class ReplayResult:
    decisions: list[Decision] = field(default_factory=list)
    messages: int = 0
    steps: int = 0  # distinct (run, step) pairs replayed
    skipped: list[str] = field(default_factory=list)


def replay(paths: Sequence[str | Path], config: AgentConfig, *, events_path: str | Path | None = None) -> ReplayResult:
    """Run recordings through a fresh supervisor; raises OSError or RecordingError for a bad file."""
    now = [0.0]
    events = EventLog(events_path, clock=lambda: now[0])
    if events_path is not None:
        events.open()
    history = History.from_config(config)
    sup = Supervisor(config, events, clock=lambda: now[0])
    sup.keep_decisions = True
    result = ReplayResult()
    seen: set[tuple[str, int]] = set()
    try:
        for rec in read_recording(paths, skipped=result.skipped):
            msg = rec.message
            if config.predict.ranks == "zero" and msg.rank != 0:
                continue
            now[0] = rec.received_at
            pushed = history.push(msg, rec.received_at)
            sup.observe(msg, pushed.series)
            result.messages += 1
            seen.add((msg.run, msg.step))
    finally:
        events.close()
    result.decisions = list(sup.decisions)
    result.steps = len(seen)
    return result


def nothing_decided(result: ReplayResult, shown: int) -> str | None:
    """The line that says a replay decided nothing (``shown``: decisions printed), or None."""
    if shown:
        return None
    held = sum(1 for d in result.decisions if d.suppressed)
    extra = f"; {held} held back by the policy's limits (--all lists them)" if held else ""
    return f"0 decisions over {result.steps} steps ({result.messages} messages{extra})"


def format_decision(d: Decision) -> str:
    """One line: step, run, what was decided and the evidence in words."""
    if d.suppressed:
        what = f"suppressed {d.action} ({d.suppressed})"
    else:
        what = describe_actions([(c.action, c.args) for c in d.commands])
    det = d.detection
    where = f" {det.layer}" if det.layer else ""
    return f"step={det.step} run={det.run} {what} [{det.detector}/{det.severity}{where}] {det.message}"
