"""A bad-batch region, a real agent, a real rollback: the whole recovery loop on the tiny GPT.

The agent is ``sentinel-agent run`` as users start it; statistics and commands cross real
ZeroMQ sockets on loopback; checkpoints are real torch.distributed.checkpoint folders.
benchmarks/recovery.py runs the same loop longer and measures the validation loss.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import recovery  # noqa: E402

from agent.spawn import AgentProcess  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # checkpoints every 20 steps, good after 10: the rollback lands on step 40 and skips to 70
    args = Namespace(kind="random", start=60, length=10, after=40, lr=3e-3, steps_back=5, skip=30)
    tmp = tmp_path_factory.mktemp("recovery")
    config = {
        "predict": {"loss": {"warmup": 32}},
        "policy": {
            "rules": [
                {
                    "detector": "loss_spike",
                    "severity": "critical",
                    "action": "rollback",
                    "args": {"steps_back": 5, "skip": 30},
                },
                {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
            ]
        },
    }
    clean = recovery.train(0, args, bad=False, agent=None, ckpt=None)
    bad = recovery.train(0, args, bad=True, agent=None, ckpt=None)
    with AgentProcess(tmp / "agent", config=config) as agent:
        recovered = recovery.train(0, args, bad=True, agent=agent, ckpt=str(tmp / "ckpt"))
        events = [json.loads(line) for line in Path(agent.events_path).read_text().splitlines()]
    return {"clean": clean, "bad": bad, "recovered": recovered, "events": events, "args": args}


def test_the_agent_rolls_back_at_the_first_bad_batch(runs: dict) -> None:
    decisions = [e for e in runs["events"] if e.get("type") == "decision" and e["action"] == "rollback"]
    assert len(decisions) == 1, decisions
    assert runs["args"].start <= decisions[0]["step"] <= runs["args"].start + 2
    assert decisions[0]["evidence"], "a decision is recorded with its evidence"
    (command,) = decisions[0]["commands"]
    assert command["action"] == "rollback"
    acks = [e for e in runs["events"] if e.get("type") == "ack" and e.get("id") == command["id"]]
    assert [a["status"] for a in acks] == ["applied"]


def test_the_recovered_run_skipped_the_region_and_beats_the_unrecovered_one(runs: dict) -> None:
    args = runs["args"]
    total = args.start + args.length + args.after
    recovered, bad, clean = runs["recovered"], runs["bad"], runs["clean"]
    assert recovered["final_step"] == total  # the same number of updates in every final model
    assert recovered["trained_steps"] > total  # the rolled-back steps were trained again on fresh batches
    assert bad["val_loss"] - clean["val_loss"] > 0.03, "the region must open a gap for the test to mean anything"
    assert recovered["val_loss"] < bad["val_loss"] - 0.5 * (bad["val_loss"] - clean["val_loss"])
