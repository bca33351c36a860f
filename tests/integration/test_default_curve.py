"""CURVE with no set-up step: the agent's own keys, their discovery file, and the explicit opt-out.

Real agent processes and real trainers on loopback.  What is checked: the key directory and the
discovery files are private (0700/0600) and reused across restarts; a trainer started before
its agent connects once the agent has advertised its keys, without a restart and without a
slow step; ``insecure: true`` is plain on both sides and says so at every start; an unsafe key
directory stops the agent.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from agent_proc import AgentProc, Pusher, free_port, make_frames

from agent import protocol
from sentinel.discovery import discovery_path
from sentinel.publish import Publisher

LAYOUT = protocol.Layout(("loss",), (), ())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_agent_makes_private_keys_once_and_advertises_them_per_endpoint(start_agent) -> None:
    agent = start_agent()
    keys = agent.workdir / "sentinel-agent-state" / "keys"
    assert _mode(keys) == 0o700
    assert _mode(keys / "server.key_secret") == 0o600 and _mode(keys / "client.key_secret") == 0o600
    files = [discovery_path(agent.stats_endpoint), discovery_path(agent.commands_endpoint)]
    records = [json.loads(f.read_bytes()) for f in files]
    assert [_mode(f) for f in files] == [0o600, 0o600] and _mode(files[0].parent) == 0o700
    assert [r["endpoint"] for r in records] == [agent.stats_endpoint, agent.commands_endpoint]
    server_public = zmq.auth.load_certificate(keys / "server.key")[0].decode()
    assert {r["server_public"] for r in records} == {server_public}
    assert "created the agent's CURVE keys" in agent.log()

    agent.restart()  # the same keys: trainers and their runs survive an agent restart
    assert json.loads(files[0].read_bytes())["server_public"] == server_public
    assert agent.log().count("created the agent's CURVE keys") == 1
    agent.stop()
    assert not any(f.exists() for f in files), "a stopped agent leaves no discovery file behind"


def test_a_trainer_started_before_its_agent_connects_once_keys_appear(tmp_path: Path, caplog) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        pub = Publisher(endpoint, "early", 0)
    assert "no CURVE keys for the agent at " + endpoint in caplog.text and not pub.security.ready
    agent = AgentProc(tmp_path / "agent", stats_endpoint=endpoint)
    try:
        slowest, step = 0.0, 0
        for _ in range(20):  # no agent yet: dropped, counted, never slow
            t = time.perf_counter()
            pub.publish(step, LAYOUT, np.array([1.0], dtype=np.float32))
            slowest, step = max(slowest, time.perf_counter() - t), step + 1
        assert pub.sent == 0 and pub.dropped == 20
        agent.start()
        deadline = time.monotonic() + 10
        while agent.scrape().value("sentinel_training_step", run="early", rank=0) is None:
            assert time.monotonic() < deadline, agent.log()
            t = time.perf_counter()
            pub.publish(step, LAYOUT, np.array([2.0], dtype=np.float32))
            slowest, step = max(slowest, time.perf_counter() - t), step + 1
            time.sleep(0.05)
        assert slowest < 0.05, slowest
        assert pub.security.mode == "discovered" and pub.security.ready
    finally:
        pub.close()
        agent.stop()


def test_insecure_is_plain_on_both_sides_and_warns_at_every_start(start_agent, caplog) -> None:
    agent = start_agent(config={"security": {"insecure": True}})
    assert "security.insecure is true: the statistics and command channel(s) are NOT authenticated" in agent.log()
    assert not discovery_path(agent.stats_endpoint).exists()
    assert not (agent.workdir / "sentinel-agent-state" / "keys").exists()
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        pub = Publisher(agent.stats_endpoint, "plain", 0, insecure=True)
    assert "publish.insecure is true" in caplog.text
    try:
        with Pusher(agent.stats_endpoint, plain=True) as push:  # so can anyone else, which is the point
            push.send(make_frames(run="anyone", scalars={"loss": 5.0}))
            agent.wait_for(lambda s: s.value("sentinel_loss", run="anyone", rank=0) == 5.0)
    finally:
        pub.close()
    agent.restart()
    assert agent.log().count("security.insecure is true") == 2


def test_an_agent_with_readable_secret_keys_refuses_to_start(tmp_path: Path) -> None:
    agent = AgentProc(tmp_path / "agent")
    agent.start().stop()
    secret = tmp_path / "agent" / "sentinel-agent-state" / "keys" / "server.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(RuntimeError, match="exited with 1") as err:
        agent.start()
    assert "has mode 0644: others could read or replace the agent's keys" in str(err.value)
