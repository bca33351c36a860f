"""The zoo's agents and arms: each run trains against a real ``sentinel-agent`` process.

Three agents serve every run of the zoo (one run name each), all with the agent's default
predictors: ``watch`` (the default policy, with rollbacks sized for runs of a few hundred steps),
``prevent`` (the same plus ``policy.prevention``) and ``advise`` (``commands.enabled: false``: it
decides and logs, and the run trains on as if unwatched).  A run's events are read back from its
agent's ``events.jsonl`` and mapped from (timeline epoch, step) to the trained step that sent them.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent.spawn import AgentProcess
from benchmarks.zoo.scenarios import Scenario
from benchmarks.zoo.train import RunResult, train

ROLLBACK = {"steps_back": 10, "skip": 40}  # PaLM's 100/200, scaled to runs of a few hundred steps
CORRECTIVE = ("rollback", "skip_update", "skip_batches", "lr_scale", "eps_scale", "stop")


def policy_rules() -> list[dict]:
    """The default rules with the PaLM rollback scaled to the zoo's run lengths."""
    from agent.policy import DEFAULT_RULES

    rules = []
    for r in DEFAULT_RULES:
        r = dict(r)
        if r["action"] == "rollback":
            r["args"] = dict(ROLLBACK)
        rules.append(r)
    return rules


def agent_configs(prevention: dict | None = None) -> dict[str, dict]:
    base = {"log_level": "warning", "policy": {"rules": policy_rules()}}
    return {
        "watch": base,
        "prevent": {**base, "policy": {**base["policy"], "prevention": {"enabled": True, **(prevention or {})}}},
        "advise": {**base, "commands": {"enabled": False}},
    }


@dataclass
class Arm:
    """One run of the zoo and what its agent made of it."""

    result: RunResult
    name: str = ""
    detections: list[dict] = field(default_factory=list)  # decision/suppressed records, with "trained"
    applied: list[tuple[str, int, str]] = field(default_factory=list)  # (action, trained step, ack status)
    risk: float | None = None  # the agent's risk score when the run ended


@dataclass(frozen=True)
class Endpoint:
    """Where a run finds its agent (picklable, for worker processes)."""

    stats: str
    commands: str | None
    events: str
    status: str  # the agent's /api/status URL


class Agents:
    """The zoo's three agent processes, started once."""

    def __init__(self, workdir: Path, prevention: dict | None = None):
        self.workdir, self.prevention = workdir, prevention
        self.procs: dict[str, AgentProcess] = {}

    def __enter__(self) -> Agents:
        for name, cfg in agent_configs(self.prevention).items():
            p = AgentProcess(self.workdir / f"agent-{name}", config=cfg)
            p.start()
            self.procs[name] = p
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs.values():
            p.stop()

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        return {n: Endpoint(p.stats_endpoint, p.commands_endpoint, str(p.events_path),
                            p.metrics_url.rsplit("/metrics", 1)[0] + "/api/status") for n, p in self.procs.items()}  # fmt: skip


def run_arm(agent: Endpoint, arm: str, s: Scenario, seed: int, init_seed: int | None = None,
            probes_every: int = 10) -> Arm:  # fmt: skip
    """Train ``s`` against ``agent`` as run ``arm:scenario:seed[:i<init>]`` and read back its events."""
    name = f"{arm}:{s.name}:{seed}" + ("" if init_seed is None else f":i{init_seed}")
    with tempfile.TemporaryDirectory(prefix="zoo-ckpt-") as ckpt:
        config = {
            "run": name,
            "log_level": "error",
            "publish": {"endpoint": agent.stats},
            "control": {"endpoint": agent.commands} if agent.commands else {"enabled": False},
            "probes": {"enabled": True, "every": probes_every},
            "checkpoint": {"dir": ckpt, "every": 20, "good_after": 5, "keep": 15},
            **s.sentinel,
        }
        result = train(s, seed, config, init_seed=init_seed)
    time.sleep(0.3)  # the agent takes in the last messages
    arm = _read_events(agent.events, name, result)
    arm.risk = _risk(agent.status, name)
    return arm


def _risk(url: str, run: str) -> float | None:
    """The agent's risk score of ``run`` now (its /api/status)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.loads(r.read())
    for entry in doc.get("runs", []):
        if entry.get("run") == run and entry.get("risk"):
            return float(entry["risk"]["score"])
    return None


def _read_events(path: str, run: str, result: RunResult) -> Arm:
    events = []
    for line in Path(path).read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("run") == run:
            events.append(e)
    index = trained_index(result.published)
    arm = Arm(result, run)
    acks = {e["id"]: e for e in events if e.get("type") == "ack"}
    for e in events:
        if e.get("type") not in ("decision", "suppressed"):
            continue
        e["trained"] = index.get((e.get("epoch", 0), e.get("step")), e.get("clock"))
        arm.detections.append(e)
        for c in e.get("commands", []):
            arm.applied.append((c["action"], e["trained"], acks.get(c["id"], {}).get("status", "no-ack")))
    return arm


def trained_index(published: list[int]) -> dict[tuple[int, int], int]:
    """(timeline epoch, step) -> trained step: a new epoch starts where the step does not go up."""
    index, epoch = {}, 0
    for t, step in enumerate(published):
        if t and step <= published[t - 1]:
            epoch += 1
        index.setdefault((epoch, step), t)
    return index
