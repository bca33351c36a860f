"""Replay: a real agent records what it receives; `sentinel-agent replay` runs the recording through
the predictors and policy offline and prints the decision the live agent took."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from agent_proc import Pusher, make_frames

TENSORS = ("h.0.attn.c_attn.weight", "h.0.mlp.c_proj.weight")


def replay(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent", "replay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


def record_a_run(start_agent) -> tuple[Path, list[dict]]:
    agent = start_agent()
    rng = np.random.default_rng(7)
    with Pusher(agent.stats_endpoint) as push:
        for step in range(300):
            loss = 3.0 + rng.normal(0, 0.02) + (6.0 if step == 250 else 0.0)
            scalars = {"loss": loss, "grad_norm": float(np.exp(rng.normal(0, 0.1))), "lr": 1e-3}
            if step % 10 == 0:
                matrix = 1e-3 * np.exp(rng.normal(0, 0.1, (2, 2)))
                frames = make_frames(run="rec", step=step, scalars=scalars, stats=("update_ratio", "grad_rms"),
                                     tensors=TENSORS, matrix=matrix)  # fmt: skip
            else:
                frames = make_frames(run="rec", step=step, scalars=scalars)
            push.send(frames)
        push.send(make_frames(run="rec", rank=1, step=300, scalars={"loss": math.nan}))  # not rank 0: not recorded
        agent.wait_for(lambda s: s.value("sentinel_agent_received_messages_total") == 301)
    agent.wait_for(lambda s: s.value("sentinel_agent_recorded_messages_total") == 300)
    assert agent.stop() == 0
    state = agent.workdir / "sentinel-agent-state"
    live = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    return state / "stats-rec.jsonl", [r for r in live if r["type"] == "decision"]


def test_replay_prints_the_decision_the_live_agent_took(start_agent, tmp_path):
    recording, live = record_a_run(start_agent)
    assert [(r["step"], r["action"]) for r in live] == [(250, "rollback")]
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()

    result = replay(str(recording), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("step=250 run=rec rollback(steps_back=100, skip=200) [loss_spike/critical] loss ")

    as_json = replay(str(recording), "--json", cwd=tmp_path)
    [record] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert record["type"] == "decision" and record["id"] == live[0]["id"]
    assert record["commands"] == live[0]["commands"] and record["evidence"] == live[0]["evidence"]
    assert list(tmp_path.iterdir()) == []  # replay writes nothing unless asked


def test_replay_with_a_stricter_policy_and_an_events_file(start_agent, tmp_path):
    recording, _ = record_a_run(start_agent)
    config = tmp_path / "agent.yaml"
    config.write_text("policy:\n  rules:\n    - {detector: loss_spike, severity: warning, action: stop}\n")
    result = replay(str(recording), "--config", str(config), "--events", str(tmp_path / "ev.jsonl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("step=250 run=rec stop() [loss_spike/critical]")
    types = [json.loads(line)["type"] for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert types == ["decision"]


def test_replay_exit_codes(tmp_path):
    not_a_recording = tmp_path / "x.jsonl"
    not_a_recording.write_text('{"some": "thing"}\n')
    result = replay(str(not_a_recording), cwd=tmp_path)
    assert result.returncode == 1 and "not a sentinel-stats recording" in result.stderr
    assert replay(str(tmp_path / "missing.jsonl"), cwd=tmp_path).returncode == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("predict: {loss: {z: 0}}\n")
    result = replay(str(not_a_recording), "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "predict.loss.z: 0" in result.stderr
    help_text = replay("--help", cwd=tmp_path).stdout
    assert "exit codes:" in help_text and "not a sentinel recording" in help_text


def test_replay_of_a_quiet_run_says_nothing_was_decided(start_agent, tmp_path):
    agent = start_agent()
    with Pusher(agent.stats_endpoint) as push:
        for step in range(50):
            push.send(make_frames(run="quiet", step=step, scalars={"loss": 3.0 + 0.001 * (step % 5), "lr": 1e-3}))
    agent.wait_for(lambda s: s.value("sentinel_agent_recorded_messages_total") == 50)
    assert agent.stop() == 0
    recording = agent.workdir / "sentinel-agent-state" / "stats-quiet.jsonl"
    result = replay(str(recording), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "0 decisions over 50 steps (50 messages)\n", result
    as_json = replay(str(recording), "--json", cwd=tmp_path)
    assert as_json.stdout == "" and "0 decisions over 50 steps" in as_json.stderr  # stdout stays JSON lines


def test_grafana_help_lists_its_exit_codes(tmp_path):
    for args in (["grafana", "--help"], ["grafana", "push", "--help"]):
        done = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "exit codes:" in done.stdout and "2  usage error" in done.stdout, args
