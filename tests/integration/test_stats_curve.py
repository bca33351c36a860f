"""CURVE on the statistics channel, with a real agent process and real ZeroMQ sockets.

Only the trainer keys in ``stats_curve.authorized_dir`` get messages in; another key or a
plain client never does, and is counted; the trainer's publisher never waits either way.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from agent_proc import make_frames

from agent import protocol
from agent.keys import create_keys
from agent.typedconfig import ConfigError
from sentinel.config import PublishConfig, PublishCurveConfig, load_config
from sentinel.publish import Publisher

LAYOUT = protocol.Layout(("loss",), ("grad_l2",), ("w",))


@pytest.fixture
def keys(tmp_path):
    return create_keys(tmp_path / "keys"), create_keys(tmp_path / "stranger")


@pytest.fixture
def curve_agent(start_agent, keys):
    agent_keys, _ = keys
    curve = {"secret_file": str(agent_keys["server_secret"]), "authorized_dir": str(agent_keys["authorized_dir"])}
    return start_agent(config={"stats_curve": curve})


def client_curve(paths: dict, server_public) -> PublishCurveConfig:
    return PublishCurveConfig(secret_file=str(paths["client_secret"]), server_public_file=str(server_public))


def publish_timed(pub: Publisher, run_steps: range, loss: float) -> float:
    """Publish one message per step; returns the longest single call in seconds."""
    longest = 0.0
    for step in run_steps:
        t0 = time.perf_counter()
        pub.publish(step, LAYOUT, np.array([loss, 1.0], dtype=np.float32))
        longest = max(longest, time.perf_counter() - t0)
    return longest


def raw_push(endpoint: str, curve: tuple[bytes, bytes, bytes] | None, frames: list[bytes], n: int) -> None:
    """A PUSH socket without IMMEDIATE: it queues while connecting and would deliver if it ever could."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(endpoint)
    for _ in range(n):
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
    time.sleep(0.5)  # several reconnect attempts, each refused
    sock.close(linger=0)
    ctx.term()


def test_authorised_publisher_gets_through_and_strangers_never_do(curve_agent, keys):
    agent_keys, stranger_keys = keys
    server_public = agent_keys["server_public"]

    intruder = Publisher(curve_agent.stats_endpoint, "intruder", 0, curve=client_curve(stranger_keys, server_public))
    slowest_intruder = publish_timed(intruder, range(200), 9.0)
    stranger_public, stranger_secret = zmq.auth.load_certificate(stranger_keys["client_secret"])
    server_key, _ = zmq.auth.load_certificate(server_public)
    raw_push(curve_agent.stats_endpoint, (stranger_public, stranger_secret, server_key),
             make_frames(run="intruder-raw", scalars={"loss": 9.0}), 50)  # fmt: skip
    scrape = curve_agent.wait_for(lambda s: (s.value("sentinel_agent_stats_refused_client_keys_total") or 0) >= 2)
    assert (scrape.value("sentinel_agent_stats_handshake_failures_total") or 0) >= 2

    good = Publisher(curve_agent.stats_endpoint, "good", 0, curve=client_curve(agent_keys, server_public))
    deadline = time.monotonic() + 10
    step = 0
    while good.sent == 0 and time.monotonic() < deadline:  # IMMEDIATE: drops until the handshake completes
        publish_timed(good, range(step, step + 1), 2.5)
        step += 1
        time.sleep(0.02)
    slowest_good = publish_timed(good, range(step, step + 50), 2.5)
    scrape = curve_agent.wait_for(
        lambda s: (
            s.value("sentinel_agent_received_messages_total") == good.sent
            and s.value("sentinel_training_step", run="good", rank=0) == step + 49
        )
    )
    assert scrape.value("sentinel_loss", run="good", rank=0) == 2.5
    assert not [lab for lab, _ in scrape.samples("sentinel_loss") if lab["run"].startswith("intruder")]
    assert intruder.sent == 0 and intruder.dropped == 200
    assert max(slowest_good, slowest_intruder) < 0.05, (slowest_good, slowest_intruder)
    t0 = time.perf_counter()
    intruder.close()
    good.close()
    assert time.perf_counter() - t0 < 1.0
    log = curve_agent.log()
    stranger_z85 = zmq.auth.load_certificate(stranger_keys["client_public"])[0].decode()
    assert f"statistics channel: refused client 127.0.0.1 with CURVE key {stranger_z85}" in log
    assert log.count("statistics channel: refused client") <= 10  # rate limited, although it retries


def test_plain_client_is_refused_and_counted(curve_agent):
    plain = Publisher(curve_agent.stats_endpoint, "plain", 0, insecure=True)
    slowest = publish_timed(plain, range(100), 1.0)
    raw_push(curve_agent.stats_endpoint, None, make_frames(run="plain-raw", scalars={"loss": 1.0}), 50)
    scrape = curve_agent.wait_for(lambda s: (s.value("sentinel_agent_stats_handshake_failures_total") or 0) >= 2)
    plain.close()
    assert scrape.value("sentinel_agent_received_messages_total") == 0
    assert scrape.value("sentinel_agent_stats_refused_client_keys_total") == 0  # never got as far as a key
    assert plain.sent == 0 and plain.dropped == 100 and slowest < 0.05
    assert "statistics channel: handshake failed" in curve_agent.log()


def test_curve_client_with_another_agents_key_never_blocks(running_agent, keys):
    agent_keys, _ = keys
    pub = Publisher(running_agent.stats_endpoint, "r", 0, curve=client_curve(agent_keys, agent_keys["server_public"]))
    slowest = publish_timed(pub, range(100), 1.0)
    scrape = running_agent.wait_for(lambda s: (s.value("sentinel_agent_stats_handshake_failures_total") or 0) >= 1)
    pub.close()
    assert pub.sent == 0 and slowest < 0.05
    assert scrape.value("sentinel_agent_received_messages_total") == 0


def run_agent(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent", "run", "--commands-endpoint", "tcp://127.0.0.1:*", "--metrics-port", "0"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=20)


def test_non_loopback_stats_endpoint_needs_curve_or_the_override(tmp_path, keys):
    (tmp_path / "plain.yaml").write_text("security: {insecure: true}\n")
    result = run_agent("--stats-endpoint", "tcp://0.0.0.0:*", "--config", str(tmp_path / "plain.yaml"))
    assert result.returncode == 2
    assert "stats_endpoint: 'tcp://0.0.0.0:*' is not a loopback address and security.insecure is true" in result.stderr

    agent_keys, _ = keys
    (tmp_path / "half.yaml").write_text(f"stats_curve: {{secret_file: {agent_keys['server_secret']}}}\n")
    result = run_agent("--config", str(tmp_path / "half.yaml"))
    assert result.returncode == 2 and "stats_curve.authorized_dir: required" in result.stderr


def test_non_loopback_stats_endpoint_with_curve_starts(start_agent, keys):
    agent_keys, _ = keys
    curve = {"secret_file": str(agent_keys["server_secret"]), "authorized_dir": str(agent_keys["authorized_dir"])}
    agent = start_agent(config={"stats_curve": curve}, stats_endpoint="tcp://0.0.0.0:*")
    port = agent.stats_endpoint.rsplit(":", 1)[1]
    curve_cfg = client_curve(agent_keys, agent_keys["server_public"])
    pub = Publisher(f"tcp://127.0.0.1:{port}", "remote", 0, curve=curve_cfg)
    deadline = time.monotonic() + 10
    while pub.sent == 0 and time.monotonic() < deadline:
        publish_timed(pub, range(1), 4.0)
        time.sleep(0.02)
    agent.wait_for(lambda s: s.value("sentinel_loss", run="remote", rank=0) == 4.0)
    pub.close()


def test_trainer_config_refuses_a_remote_endpoint_without_authentication(keys):
    remote = {"endpoint": "tcp://10.1.2.3:5557", "insecure": True}
    with pytest.raises(ConfigError, match=r"publish.endpoint: 'tcp://10.1.2.3:5557' is not a loopback address"):
        load_config({"publish": remote})
    with pytest.raises(ConfigError, match=r"publish.allow_insecure_remote: needs publish.insecure: true"):
        load_config({"publish": {"endpoint": "tcp://10.1.2.3:5557", "allow_insecure_remote": True}})
    cfg = load_config({"publish": {**remote, "allow_insecure_remote": True}})
    assert cfg.publish.allow_insecure_remote
    assert load_config({"publish": {"endpoint": "tcp://10.1.2.3:5557"}}).publish.curve.secret_file is None
    with pytest.raises(ConfigError, match="publish.curve: secret_file and server_public_file go together"):
        load_config({"publish": {"curve": {"secret_file": "x"}}})
    agent_keys, _ = keys
    bad = PublishCurveConfig(secret_file=str(agent_keys["client_public"]), server_public_file="/nonexistent")
    with pytest.raises(ConfigError, match="publish.curve.secret_file: .* holds no secret key"):
        Publisher("tcp://127.0.0.1:9", "r", 0, curve=bad)
    missing = PublishCurveConfig(secret_file=str(agent_keys["client_secret"]), server_public_file="/nonexistent")
    with pytest.raises(ConfigError, match="publish.curve.server_public_file: cannot load"):
        Publisher("tcp://127.0.0.1:9", "r", 0, curve=missing)
    assert isinstance(load_config({}).publish, PublishConfig)
