"""The three attacks of a process on the same host, against the default configuration, over real sockets.

A real agent process (``sentinel-agent run``, no security settings) and a real trainer
(``sentinel.attach``, no security settings) on loopback; the attacker is this test process
playing (1) a fake agent that binds the command port first and sends stop and rollback,
(2) a second "trainer" that says hello for the victim's run to take its commands and ack them
falsely, (3) a publisher of forged statistics (loss 1e30, NaN) under the victim's run name.
Each attacker comes three ways: without CURVE, with CURVE keys of its own, and (2, 3) with a key
the agent admits but that does not own the run.  Nothing may reach the trainer or the policy.
Last, the key rotation path: ``sentinel-agent keys --force`` and a restart of both sides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from agent_proc import AgentProc, Pusher, make_frames, nonfinite_policy, trainer_config
from commands_client import TrainerClient, wait_until

import sentinel
from agent import cli
from agent.commands import Ack, Command, Hello, decode
from agent.keys import create_keys
from sentinel.discovery import discovery_path

FORGED = [("loss 1e30", 1e30), ("NaN loss", math.nan)]


def count(scrape, metric: str, **labels: object) -> float:
    return scrape.value(metric, **labels) or 0.0


def _attach(endpoints: AgentProc | dict, run: str, **extra):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if isinstance(endpoints, AgentProc):
        cfg = trainer_config(endpoints, run, **extra)
    else:
        cfg = {"run": run, **endpoints, **extra}
    cfg.setdefault("control", {})["hello_interval"] = 0.2
    return sentinel.attach(model, optimizer, **cfg), model, optimizer


def _step(sn, model, optimizer, loss: float | None = None) -> None:
    out = model(torch.randn(8, 4)).square().mean()
    out.backward()
    optimizer.step()
    optimizer.zero_grad()
    sn.observe(loss=out if loss is None else torch.tensor(loss))


def _connected(agent: AgentProc, sn, model, optimizer, batches=None) -> None:
    """Step until the agent has the trainer's hello (a hello goes out at a step boundary once connected)."""
    deadline = time.monotonic() + 10
    while agent.scrape().value("sentinel_agent_command_connected_runs") != 1:
        assert time.monotonic() < deadline, agent.log()
        if batches is not None:
            next(batches)
        _step(sn, model, optimizer)
        time.sleep(0.05)


def _seen(agent: AgentProc, sn, model, optimizer, run: str) -> None:
    """Step until the agent has this trainer's latest step (statistics drop until the handshake is done)."""
    deadline = time.monotonic() + 10
    while True:
        _step(sn, model, optimizer)
        if agent.scrape().value("sentinel_training_step", run=run, rank=0) == sn.step - 1:
            return
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)


def _send(sock: zmq.Socket, data: bytes) -> None:
    """An attacker's send: a socket whose handshake failed has no peer to queue for."""
    with contextlib.suppress(zmq.Again):
        sock.send(data, zmq.NOBLOCK)


def _keys(directory: Path) -> tuple[bytes, bytes]:
    """A fresh CURVE pair (public, secret) of an attacker."""
    directory.mkdir(parents=True, exist_ok=True)
    _, secret = zmq.auth.create_certificates(directory, "attacker")
    return zmq.auth.load_certificate(secret)


def _server_public(endpoint: str) -> bytes:
    return json.loads(discovery_path(endpoint).read_bytes())["server_public"].encode()


def _admitted_stranger(start_agent, tmp_path: Path, **kwargs) -> tuple[AgentProc, tuple[bytes, bytes]]:
    """An agent whose authorized/ also admits a second trainer key (an operator's other job): the attacker's."""
    keys_dir = tmp_path / "agent0" / "sentinel-agent-state" / "keys"
    create_keys(keys_dir)
    other = tmp_path / "other"
    other.mkdir()
    public_file, _ = zmq.auth.create_certificates(other, "other")
    (keys_dir / "authorized" / "other.key").write_bytes(Path(public_file).read_bytes())
    agent = start_agent(**kwargs)
    return agent, zmq.auth.load_certificate(other / "other.key_secret")


# -- 1. a fake agent binds the command port first ------------------------------------------------


@pytest.mark.parametrize("fake", ["plain", "own-curve-keys"])
def test_a_fake_agent_on_the_command_port_commands_nothing(start_agent, tmp_path: Path, fake: str) -> None:
    """The real agent ran (its keys are on disk, the trainer pins them) and is gone; an impostor takes
    its port, with or without CURVE, and sends stop and rollback to whoever connects."""
    agent = start_agent()
    endpoint = agent.commands_endpoint
    sn, model, optimizer = _attach(agent, "victim", checkpoint={"dir": str(tmp_path / "ckpt"), "every": 2})
    _connected(agent, sn, model, optimizer)
    agent.stop()  # its discovery file goes with it; the trainer keeps the key it has

    ctx = zmq.Context()
    impostor = ctx.socket(zmq.ROUTER)
    impostor.setsockopt(zmq.LINGER, 0)
    if fake == "own-curve-keys":
        public, secret = _keys(tmp_path / "impostor")
        impostor.curve_server, impostor.curve_secretkey, impostor.curve_publickey = True, secret, public
    impostor.bind(endpoint)
    heard = []
    stop = Command(id="evil-stop", run="victim", action="stop", reason="forged")
    rollback = Command(id="evil-rb", run="victim", action="rollback", args={"steps_back": 30, "skip": 5})
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            _step(sn, model, optimizer)
            while impostor.poll(5):
                peer, raw = impostor.recv_multipart()
                heard.append(decode(raw))
                for cmd in (stop, rollback):
                    impostor.send_multipart([peer, cmd.encode()])
        assert heard == [], "the trainer talked to an impostor"
        assert not sn.should_stop and sn.control.applied == 0 and sn.control.rejected == 0
        assert sn.control.client.hellos >= 1  # it kept trying, and never blocked
    finally:
        sn.close()
        impostor.close(linger=0)
        ctx.term()


def test_a_trainer_started_before_any_agent_trusts_no_one(tmp_path: Path) -> None:
    """No agent has ever advertised keys for the port: the trainer does not connect at all, so an
    impostor listening there hears nothing; a discovery file others could write is not trusted."""
    ctx = zmq.Context()
    impostor = ctx.socket(zmq.ROUTER)
    impostor.setsockopt(zmq.LINGER, 0)
    port = impostor.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    planted = discovery_path(endpoint)
    public, secret = _keys(tmp_path / "impostor")
    try:
        sn, model, optimizer = _attach({"publish": {"enabled": False}, "control": {"endpoint": endpoint}}, "victim")
        for _ in range(20):
            _step(sn, model, optimizer)
        assert not impostor.poll(200) and sn.control.client.hellos == 0
        # the impostor's own keys, in a file others may write: refused
        planted.write_text(
            json.dumps({"v": 1, "client_public": "x" * 40, "client_secret": "y" * 40, "server_public": public.decode()})
        )
        os.chmod(planted, 0o666)
        time.sleep(1.1)
        for _ in range(20):
            _step(sn, model, optimizer)
        assert not impostor.poll(200) and sn.control.client.hellos == 0
        assert "not trusted" in sn.control.client.security.discovered.problem
        sn.close()
    finally:
        planted.unlink(missing_ok=True)
        impostor.close(linger=0)
        ctx.term()


# -- 2. a second "trainer" hijacks the run's commands and acks them falsely ----------------------


def test_a_second_trainer_cannot_take_the_runs_commands_or_falsify_its_acks(start_agent, tmp_path: Path) -> None:
    agent, admitted = _admitted_stranger(start_agent, tmp_path, config=nonfinite_policy("skip_batches", n=3))
    endpoint = agent.commands_endpoint
    server = _server_public(endpoint)
    sn, model, optimizer = _attach(agent, "victim")
    batches = sn.batches(list(range(1000)))
    next(batches)
    _connected(agent, sn, model, optimizer, batches)

    stranger = _keys(tmp_path / "stranger")
    impostors = {
        "plain": TrainerClient(endpoint, run="victim", plain=True),
        "unknown key": TrainerClient(endpoint, run="victim", curve=(*stranger, server)),
        "admitted key": TrainerClient(endpoint, run="victim", curve=(*admitted, server)),
    }
    try:
        for _ in range(5):  # a hello every 0.1 s, as in the attack
            for imp in impostors.values():
                _send(imp.sock, Hello(run="victim", rank=0, step=10_000).encode())
            time.sleep(0.1)
        scrape = agent.wait_for(
            lambda s: count(s, "sentinel_agent_refused_total", reason="hello_from_another_key") >= 5
        )
        assert count(scrape, "sentinel_agent_refused_client_keys_total") >= 1
        assert count(scrape, "sentinel_agent_command_handshake_failures_total") >= 1

        _step(sn, model, optimizer, loss=math.nan)  # a real decision for the victim's run
        wait_until(lambda: [e for e in agent.events() if e["type"] == "sent"], timeout=10)
        decision = [e for e in agent.events() if e["type"] == "decision"][0]
        cid = decision["commands"][0]["id"]
        for imp in impostors.values():  # the id leaked: a false ack before the victim's
            _send(imp.sock, Ack(id=cid, run="victim", status="applied", step=10_000, detail="forged").encode())
            assert imp.receive(timeout=0.5) is None, "an impostor received the victim's command"
        agent.wait_for(lambda s: count(s, "sentinel_agent_refused_total", reason="ack_from_another_key") == 1)
        assert not [e for e in agent.events() if e["type"] == "ack"]

        position = sn.position.index
        deadline = time.monotonic() + 10
        while not [e for e in agent.events() if e["type"] == "ack"]:
            assert time.monotonic() < deadline, agent.log()
            next(batches)
            _step(sn, model, optimizer)
        (ack,) = [e for e in agent.events() if e["type"] == "ack"]
        victim_key = zmq.auth.load_certificate(agent.workdir / "sentinel-agent-state" / "keys" / "client.key_secret")[
            0
        ].decode()
        assert (ack["id"], ack["status"], ack["key"]) == (cid, "applied", victim_key)
        assert sn.control.applied == 1 and sn.position.index >= position + 3
    finally:
        for imp in impostors.values():
            imp.close()
        sn.close()


def test_a_restarted_trainer_with_the_same_key_takes_its_run_back(start_agent) -> None:
    agent = start_agent(config=nonfinite_policy("warn"))
    sn, model, optimizer = _attach(agent, "again")
    _seen(agent, sn, model, optimizer, "again")
    sn.close()
    sn, model, optimizer = _attach(agent, "again")  # the same trainer, restarted: same discovered key
    _seen(agent, sn, model, optimizer, "again")
    _step(sn, model, optimizer, loss=math.nan)
    deadline = time.monotonic() + 10
    while not agent.acks("warn"):
        assert time.monotonic() < deadline, agent.log()
        _step(sn, model, optimizer)
    assert agent.acks("warn")[0]["status"] == "applied"
    scrape = agent.scrape()
    assert all(v == 0 for _, v in scrape.samples("sentinel_agent_refused_total"))
    sn.close()


# -- 3. forged statistics under the victim's run name ------------------------------------------


def test_forged_statistics_for_the_victims_run_never_reach_the_policy(start_agent, tmp_path: Path) -> None:
    agent, admitted = _admitted_stranger(start_agent, tmp_path, config=nonfinite_policy("stop"))
    endpoint = agent.stats_endpoint
    server = _server_public(endpoint)
    sn, model, optimizer = _attach(agent, "victim")
    _seen(agent, sn, model, optimizer, "victim")

    stranger = _keys(tmp_path / "stranger")
    attackers = {
        "plain": Pusher(endpoint, plain=True),
        "unknown key": Pusher(endpoint, curve=(*stranger, server)),
        "admitted key": Pusher(endpoint, curve=(*admitted, server)),
    }
    try:
        for step, (_, loss) in enumerate(FORGED * 5, start=sn.step):
            for push in attackers.values():
                with contextlib.suppress(zmq.Again):  # a refused handshake leaves no peer to queue for
                    push.sock.send_multipart(make_frames(run="victim", step=step, scalars={"loss": loss}), zmq.NOBLOCK)
        reason = "statistics_from_another_key"
        scrape = agent.wait_for(lambda s: count(s, "sentinel_agent_refused_total", reason=reason) == 10)
        assert count(scrape, "sentinel_agent_stats_refused_client_keys_total") >= 1
        assert count(scrape, "sentinel_agent_stats_handshake_failures_total") >= 1
        _seen(agent, sn, model, optimizer, "victim")
        scrape = agent.scrape()
        loss = scrape.value("sentinel_loss", run="victim", rank=0)
        assert loss is not None and math.isfinite(loss) and loss < 10
        assert not [e for e in agent.events() if e["type"] in ("decision", "suppressed")], "the policy saw a forgery"
        assert not sn.should_stop
    finally:
        for push in attackers.values():
            push.sock.close(linger=0)
            push.context.term()
        sn.close()


# -- the key rotation path ------------------------------------------------------------------------


def test_key_rotation_then_a_restart_of_both_sides(start_agent) -> None:
    agent = start_agent()
    keys_dir = agent.workdir / "sentinel-agent-state" / "keys"
    old_client = zmq.auth.load_certificate(keys_dir / "client.key_secret")
    old_server = _server_public(agent.stats_endpoint)
    sn, model, optimizer = _attach(agent, "rotate")
    _seen(agent, sn, model, optimizer, "rotate")
    sn.close()
    agent.stop()

    assert cli.main(["keys", str(keys_dir)]) == cli.EXIT_RUNTIME  # existing keys are never replaced silently
    assert cli.main(["keys", "--force", str(keys_dir)]) == cli.EXIT_OK
    agent.restart()
    new_server = _server_public(agent.stats_endpoint)
    assert new_server != old_server

    sn, model, optimizer = _attach(agent, "rotate")  # the trainer, restarted: it finds the new keys
    _seen(agent, sn, model, optimizer, "rotate")
    sn.close()
    with Pusher(agent.stats_endpoint, curve=(*old_client, new_server)) as old:  # the retired trainer key
        old.send(make_frames(run="retired", scalars={"loss": 1.0}))
        agent.wait_for(lambda s: count(s, "sentinel_agent_stats_refused_client_keys_total") >= 1)
    assert agent.scrape().value("sentinel_loss", run="retired", rank=0) is None
