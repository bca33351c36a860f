"""The whole loop on a real agent process: statistics in over ZeroMQ, a loss spike detected, the
decision written to events.jsonl, a rollback command to the trainer's DEALER, its ack recorded,
and all of it on /metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from agent_proc import Pusher, make_frames
from commands_client import TrainerClient, wait_until


def loss_series(n: int, spike_at: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    loss = 3.0 + rng.normal(0, 0.02, n)
    loss[spike_at] *= 3.0
    return loss.tolist()


def test_spike_to_rollback_command_to_ack(start_agent):
    agent = start_agent()
    trainer = TrainerClient(agent.commands_endpoint, run="r1")
    try:
        trainer.hello(step=0)
        with Pusher(agent.stats_endpoint) as push:
            for step, loss in enumerate(loss_series(200, spike_at=150)):
                push.send(make_frames(run="r1", step=step, scalars={"loss": loss, "grad_norm": 1.0}))
            cmd = trainer.receive(timeout=10)
        assert cmd is not None, agent.log()
        assert (cmd.run, cmd.action, cmd.args) == ("r1", "rollback", {"steps_back": 100, "skip": 200})
        assert "loss_spike (critical)" in cmd.reason and "step 150" in cmd.reason
        trainer.ack(cmd, step=201)
        agent.wait_for(lambda s: s.value("sentinel_agent_command_acks_total", status="applied") == 1)
        scrape = agent.wait_for(lambda s: s.value("sentinel_agent_recorded_messages_total") == 200)
        assert scrape.value("sentinel_agent_actions_total", action="rollback") == 1
        assert scrape.value("sentinel_agent_decisions_total") == 1
        assert scrape.value("sentinel_detections_total", run="r1", detector="loss_spike", severity="critical") == 1
        assert scrape.value("sentinel_agent_commands_sent_total", action="rollback") == 1
        assert scrape.value("sentinel_spike_risk", run="r1") > 0
    finally:
        trainer.close()
    events = agent.workdir / "sentinel-agent-state" / "events.jsonl"
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [r["type"] for r in records] == ["agent_start", "decision", "sent", "ack"]
    decision = records[1]
    assert decision["commands"][0]["id"] == cmd.id == records[2]["id"] == records[3]["id"]
    assert decision["evidence"]["z"] > 6 and decision["step"] == 150
    assert "decision d-" in agent.log() and "rollback(steps_back=100, skip=200)" in agent.log()


def test_restarted_agent_resends_an_unacknowledged_command_and_decides_nothing_new(start_agent):
    agent = start_agent()
    with Pusher(agent.stats_endpoint) as push:
        for step, loss in enumerate(loss_series(200, spike_at=150)):
            push.send(make_frames(run="r2", step=step, scalars={"loss": loss}))
        agent.wait_for(lambda s: s.value("sentinel_agent_undeliverable_commands_total") == 1)
    agent.restart()
    trainer = TrainerClient(agent.commands_endpoint, run="r2")
    try:
        trainer.hello(step=201)
        cmd = trainer.receive(timeout=10)
        assert cmd is not None and cmd.action == "rollback", agent.log()
        trainer.ack(cmd, step=201)
        agent.wait_for(lambda s: s.value("sentinel_agent_command_acks_total", status="applied") == 1)
        assert agent.scrape().value("sentinel_agent_decisions_total") == 0  # in this process
    finally:
        trainer.close()
    events = agent.workdir / "sentinel-agent-state" / "events.jsonl"
    types = [json.loads(line)["type"] for line in events.read_text().splitlines()]
    assert types == ["agent_start", "decision", "undeliverable", "agent_start", "sent", "ack"]
    wait_until(lambda: "will be resent" in agent.log())


def _decision_steps(agent, run: str) -> list[int]:
    events = agent.workdir / "sentinel-agent-state" / "events.jsonl"
    records = [json.loads(line) for line in events.read_text().splitlines()]
    return [r["step"] for r in records if r["type"] == "decision" and r["run"] == run]


@pytest.mark.parametrize("warm", [True, False], ids=["warm-start", "cold-start"])
def test_killed_agent_restarts_with_its_detector_state_and_repeats_no_decision(start_agent, warm):
    """SIGKILL mid-run, restart on the same ports and state dir.  Run ``a`` was decided on before
    the kill and must not be decided on again; run ``b`` spikes 10 steps after the restart, well
    inside a fresh detector's 64-value warm-up: only the state rebuilt from the recordings sees it."""
    config = None if warm else {"recording": {"warm_start_max_age_seconds": 0}}
    agent = start_agent(config=config)
    loss_a, loss_b = loss_series(140, spike_at=100, seed=1), loss_series(170, spike_at=150, seed=2)
    with Pusher(agent.stats_endpoint) as push:
        for step in range(140):
            push.send(make_frames(run="a", step=step, scalars={"loss": loss_a[step]}))
            push.send(make_frames(run="b", step=step, scalars={"loss": loss_b[step]}))
        agent.wait_for(lambda s: s.value("sentinel_agent_recorded_messages_total") == 280)
    assert _decision_steps(agent, "a") == [100]
    agent.kill()
    agent.restart()
    with Pusher(agent.stats_endpoint) as push:
        for step in range(140, 170):
            push.send(make_frames(run="b", step=step, scalars={"loss": loss_b[step]}))
        agent.wait_for(lambda s: s.value("sentinel_agent_recorded_messages_total") == 30)
    assert _decision_steps(agent, "a") == [100], agent.log()
    if warm:
        assert _decision_steps(agent, "b") == [150], agent.log()
        assert "warm start: 280 message(s) of 2 run(s)" in agent.log()
        assert agent.scrape().value("sentinel_training_step", run="a", rank="0") == 139
    else:
        assert _decision_steps(agent, "b") == []
