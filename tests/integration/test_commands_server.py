"""The command channel over real ZeroMQ sockets on loopback: delivery, resend until ack, events,
bad frames counted by reason, CURVE with an authorised key and a refused one, and the refusal to
bind beyond loopback without CURVE."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from commands_client import TrainerClient, wait_until

from agent import cli
from agent.command_server import CommandServer
from agent.commands import Ack, Command
from agent.config import load_config
from agent.events import EventLog, read_events


@pytest.fixture
def server(tmp_path):
    started = []

    def start(**commands) -> tuple[CommandServer, EventLog]:
        cfg = load_config(commands={"endpoint": "tcp://127.0.0.1:0", "resend_seconds": 0.2, **commands})
        events = EventLog(tmp_path / "events.jsonl")
        events.open()
        srv = CommandServer(cfg.commands, events)
        srv.start()
        started.append((srv, events))
        return srv, events

    yield start
    for srv, events in started:
        srv.stop()
        events.close()


def command(cid: str = "c-1", run: str = "r", action: str = "rollback") -> Command:
    args = {"steps_back": 100, "skip": 200} if action == "rollback" else {}
    return Command(id=cid, run=run, action=action, args=args, reason="test", issued_at=time.time())


def test_command_is_resent_with_the_same_id_until_acknowledged(server):
    srv, events = server()
    client = TrainerClient(srv.endpoint, plain=True)
    try:
        client.hello(step=10)
        wait_until(lambda: srv.connected_runs == ["r"])
        srv.submit([command()])
        first = client.receive()
        again = client.receive()  # not acknowledged: sent again after resend_seconds
        assert first == again and first.id == "c-1" and first.args == {"steps_back": 100, "skip": 200}
        client.ack(again, step=11)
        wait_until(lambda: srv.snapshot().acks == {"applied": 1})
        assert client.receive(timeout=0.6) is None  # no resend after the ack
        stats = srv.snapshot()
        assert stats.sent == {"rollback": 1} and stats.resends >= 1 and stats.pending == 0
        records = [(r["type"], r.get("id"), r.get("status")) for r in read_events(events.path)]
        assert records == [("sent", "c-1", None), ("ack", "c-1", "applied")]
    finally:
        client.close()


def test_command_for_a_run_without_trainer_waits_for_its_hello(server, caplog):
    srv, events = server()
    srv.submit([command(run="late")])
    wait_until(lambda: srv.snapshot().undeliverable == 1)
    assert "no trainer of this run has said hello" in caplog.text
    client = TrainerClient(srv.endpoint, run="late", plain=True)
    try:
        client.hello()
        cmd = client.receive()
        assert cmd is not None and cmd.run == "late"
        client.ack(cmd, status="duplicate")
        wait_until(lambda: srv.snapshot().acks == {"duplicate": 1})
        types = [r["type"] for r in read_events(events.path)]
        assert types == ["undeliverable", "sent", "ack"]
    finally:
        client.close()


def test_bad_frames_are_counted_by_reason_and_the_server_carries_on(server, caplog):
    srv, _ = server()
    client = TrainerClient(srv.endpoint, plain=True)
    try:
        client.send_raw(b"not json")
        client.send_raw(json.dumps({"v": 2, "type": "hello"}).encode())
        client.send_raw(json.dumps({"v": 1, "type": "hello", "run": "", "rank": 0, "step": 0}).encode())
        client.send_raw(command().encode())  # trainers do not send commands
        client.send_raw(Ack(id="c-unknown", run="r", status="applied", step=1).encode())
        client.send_raw(b"a", b"b")
        expected = {"malformed": 1, "unsupported_version": 1, "bad_field": 1, "unexpected_type": 1, "unknown_id": 1,
                    "frame_count": 1}  # fmt: skip
        wait_until(lambda: {k: v for k, v in srv.snapshot().rejected.items() if v} == expected)
        assert "rejected command-channel frame: reason=unknown_id" in caplog.text
        client.hello()
        srv.submit([command()])
        assert client.receive() is not None and srv.alive
    finally:
        client.close()


def test_restored_pending_command_is_resent_after_restart(server, tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.open()
    cmd = command("c-old")
    log.append({"type": "decision", "id": "d-1", "run": "r", "step": 5, "action": "rollback", "reason": "x",
                "commands": [{"id": cmd.id, "action": cmd.action, "args": cmd.args}]})  # fmt: skip
    log.append({"type": "decision", "id": "d-2", "run": "r", "step": 6, "action": "warn", "reason": "y",
                "commands": [{"id": "c-done", "action": "warn", "args": {}}]})  # fmt: skip
    log.append({"type": "ack", "id": "c-done", "run": "r", "status": "applied", "step": 7})
    log.close()
    srv, events = server()
    srv.restore(list(read_events(path)))
    client = TrainerClient(srv.endpoint, plain=True)
    try:
        client.hello()
        got = client.receive()
        assert got is not None and got.id == "c-old"
        client.ack(got)
        assert client.receive(timeout=0.5) is None  # c-done was acknowledged before the restart
    finally:
        client.close()


# -- CURVE ---------------------------------------------------------------------------------------


def test_keys_command_makes_a_usable_key_directory(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert cli.main(["keys", str(keys)]) == 0
    out = capsys.readouterr().out
    assert "server.key_secret" in out and "authorized" in out
    names = sorted(str(p.relative_to(keys)) for p in keys.rglob("*") if p.is_file())
    assert names == ["authorized/client.key", "client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    assert cli.main(["keys", str(keys)]) == 1  # never overwrites without --force
    assert "--force" in capsys.readouterr().err
    assert cli.main(["keys", str(keys), "--force"]) == 0


def test_curve_admits_the_authorised_key_and_logs_the_refused_one(server, tmp_path, caplog):
    keys = tmp_path / "keys"
    assert cli.main(["keys", str(keys)]) == 0
    srv, _ = server(curve={"secret_file": str(keys / "server.key_secret"), "authorized_dir": str(keys / "authorized")})
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    client_public, client_secret = zmq.auth.load_certificate(keys / "client.key_secret")
    good = TrainerClient(srv.endpoint, run="good", curve=(client_public, client_secret, server_public))
    stranger_public, stranger_secret = zmq.curve_keypair()
    bad = TrainerClient(srv.endpoint, run="bad", curve=(stranger_public, stranger_secret, server_public))
    try:
        with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
            good.hello()
            bad.hello()
            wait_until(lambda: srv.snapshot().refused_keys >= 1)
            srv.submit([command("c-good", run="good"), command("c-bad", run="bad")])
            got = good.receive()
            assert got is not None and got.id == "c-good"
            assert bad.receive(timeout=0.5) is None
        assert srv.connected_runs == ["good"]
        refusals = [r.getMessage() for r in caplog.records if "refused client" in r.getMessage()]
        assert refusals and stranger_public.decode() in refusals[0]
        assert client_public.decode() not in " ".join(refusals)
    finally:
        good.close()
        bad.close()


def test_plain_client_cannot_talk_to_a_curve_server(server, tmp_path):
    keys = tmp_path / "keys"
    cli.main(["keys", str(keys)])
    srv, _ = server(curve={"secret_file": str(keys / "server.key_secret"), "authorized_dir": str(keys / "authorized")})
    plain = TrainerClient(srv.endpoint, plain=True)
    try:
        plain.hello()
        wait_until(lambda: srv.snapshot().handshake_failures >= 1)
        assert srv.connected_runs == []
    finally:
        plain.close()


def run_agent(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent", "run", "--stats-endpoint", "tcp://127.0.0.1:*", "--metrics-port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)


def test_non_loopback_command_endpoint_without_authentication_exits_2(tmp_path):
    (tmp_path / "agent.yaml").write_text("security: {insecure: true}\n")
    result = run_agent("--commands-endpoint", "tcp://0.0.0.0:0", "--config", str(tmp_path / "agent.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "commands.endpoint: 'tcp://0.0.0.0:0' is not a loopback address and security.insecure is true" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_curve_config_must_name_existing_files(tmp_path):
    (tmp_path / "agent.yaml").write_text("commands: {curve: {secret_file: nope, authorized_dir: nope}}\n")
    result = run_agent("--config", str(tmp_path / "agent.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and "commands.curve.secret_file: 'nope' is not a file" in result.stderr
