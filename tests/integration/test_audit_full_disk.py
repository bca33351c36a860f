"""Fail closed on the audit trail: a decision whose record cannot be written and fsynced sends no command.

A real agent (in this process, to reach its event log), a real trainer client on the command
channel and real statistics carrying a NaN loss, on the default (CURVE) settings.  The disk is
really full: a 256 KiB tmpfs holding the state directory, filled up once the agent runs (needs
root to mount; skipped otherwise), or the events file's descriptor pointed at /dev/full, where
every write fails with ENOSPC.  (A full tmpfs still takes an append that fits in the file's
last page, as any file system does within its last block: that page is filled first.)  Either way: no command reaches the trainer, the agent logs an
ERROR and exports ``sentinel_agent_event_log_errors_total``; once space is back, the next
decision is written first and then sent.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from agent_proc import Pusher, make_frames, nonfinite_policy, parse_metrics
from commands_client import TrainerClient, wait_until
from prometheus_client import generate_latest

from agent.daemon import Agent
from agent.events import read_events


def _config(state_dir: Path) -> dict:
    return {
        **nonfinite_policy("stop"),
        "state_dir": str(state_dir),
        "stats_endpoint": "tcp://127.0.0.1:0",
        "commands": {"endpoint": "tcp://127.0.0.1:0", "resend_seconds": 0.2},
        "metrics": {"port": 0},
        "recording": {"enabled": False},
    }


def _fill(directory: Path, events: Path) -> Path:
    """Write zeros into ``directory`` until its file system says ENOSPC, then blank lines (which
    readers skip) into the events file until its last page is full too; returns the filler file."""
    filler = directory / "filler"
    for path, chunk, mode in ((filler, b"\0" * 4096, "wb"), (events, b"\n", "ab")):
        with open(path, mode, buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the /dev/full test covers the full disk")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _run_full_disk(state_dir: Path, make_full, make_room, caplog) -> None:
    agent = Agent(_config(state_dir)).start()
    trainer = TrainerClient(agent.commands_endpoint, run="full")
    try:
        trainer.hello()
        wait_until(lambda: agent.commands.connected_runs == ["full"])
        make_full(agent)
        with Pusher(agent.stats_endpoint) as push, caplog.at_level(logging.ERROR, logger="sentinel.agent"):
            push.send(make_frames(run="full", step=1, scalars={"loss": math.nan}))
            wait_until(lambda: agent.supervisor.snapshot().event_log_errors >= 1, timeout=10)
            assert trainer.receive(timeout=1.5) is None, "a command left without its record"
            assert "cannot write the event log" in caplog.text and "decision not taken" in caplog.text
            scrape = parse_metrics(generate_latest(agent.registry).decode())
            assert scrape.value("sentinel_agent_event_log_errors_total") >= 1
            assert (scrape.value("sentinel_agent_commands_sent_total", action="stop") or 0) == 0

            make_room(agent)
            push.send(make_frames(run="full", step=2, scalars={"loss": 1.0}))  # ends the NaN episode
            push.send(make_frames(run="full", step=3, scalars={"loss": math.nan}))
            cmd = trainer.receive(timeout=10)
        assert cmd is not None and cmd.action == "stop"
        on_disk = [r for r in read_events(agent.events.path) if r["type"] == "decision"]
        assert [c["id"] for r in on_disk for c in r["commands"]] == [cmd.id]  # written before it was sent
    finally:
        trainer.close()
        agent.stop()


def test_a_full_tmpfs_blocks_every_command_until_its_record_is_on_disk(tiny_tmpfs: Path, caplog) -> None:
    filler: list[Path] = []
    _run_full_disk(
        tiny_tmpfs,
        make_full=lambda agent: filler.append(_fill(tiny_tmpfs, agent.events.path)),
        make_room=lambda agent: filler[0].unlink(),
        caplog=caplog,
    )


def test_an_events_file_on_dev_full_blocks_every_command(tmp_path: Path, caplog) -> None:
    saved: list[int] = []

    def make_full(agent: Agent) -> None:
        saved.append(os.dup(agent.events._fd))
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, agent.events._fd)  # the same descriptor, now a device where every write is ENOSPC
        os.close(full)

    def make_room(agent: Agent) -> None:
        os.dup2(saved[0], agent.events._fd)
        os.close(saved[0])

    _run_full_disk(tmp_path / "state", make_full, make_room, caplog)
