"""A real agent process fed bad input over a real ZeroMQ socket: it counts, logs and survives.

Also the process contract around it: clean stop on SIGTERM, restart on the same ports,
exit code 1 with one line when an address is taken.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from agent_proc import Pusher, make_frames, with_header

from agent.protocol import REJECT_REASONS, Layout, ProtocolError, decode, layout_id

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz  # noqa: E402

MAX_BYTES = 65536


def received(n: int):
    return lambda s: s.value("sentinel_agent_received_messages_total") == n


def test_bad_messages_are_counted_logged_and_survived(start_agent):
    agent = start_agent(config={"limits": {"max_message_bytes": MAX_BYTES}})
    good = make_frames(run="r", scalars={"loss": 3.0})
    bad = {
        "malformed_header": [b"{this is not json", *good[1:]],
        "unsupported_version": with_header(good, v=2),
        "size_mismatch": [good[0], good[1], good[2][:-2]],  # truncated data frame
        "oversized": [good[0], good[1], b"\0" * (MAX_BYTES + 100)],
        "frame_count": [good[0], good[1]],
        "bad_field": with_header(good, rank=-3),
        "layout_mismatch": [  # a layout id the agent has not cached yet, with another layout's bytes
            with_header(good, layout=layout_id(Layout(("never_sent",), (), ()).encode()))[0],
            good[1],
            good[2],
        ],
        "malformed_layout": [
            with_header(good, layout=layout_id(b'{"scalars": 1}'))[0],
            b'{"scalars": 1}',
            good[2],
        ],
    }
    assert set(bad) == set(REJECT_REASONS)
    nonfinite = make_frames(
        run="r",
        step=1,
        scalars={"loss": np.nan, "grad_norm": np.inf},
        stats=("grad_l2",),
        tensors=("w",),
        matrix=[[np.nan]],
    )
    final = make_frames(run="r", step=2, scalars={"loss": 1.25})
    with Pusher(agent.stats_endpoint) as push:
        for frames in bad.values():
            push.send(frames)
        push.send([good[0], good[1], good[2], b"4", b"5", b"6"])  # too many frames
        push.send(nonfinite)
        push.send(final)
        scrape = agent.wait_for(received(len(bad) + 3))

    assert agent.alive
    rejected = {lab["reason"]: v for lab, v in scrape.samples("sentinel_agent_rejected_messages_total")}
    assert rejected == {reason: (2.0 if reason == "frame_count" else 1.0) for reason in REJECT_REASONS}
    assert scrape.value("sentinel_agent_nonfinite_values_total", run="r", rank=0) == 3
    assert scrape.value("sentinel_loss", run="r", rank=0) == 1.25
    assert scrape.value("sentinel_training_step", run="r", rank=0) == 2

    log = agent.log()
    for reason in REJECT_REASONS:
        lines = [line for line in log.splitlines() if f"rejected message: reason={reason} " in line]
        assert len(lines) == (2 if reason == "frame_count" else 1), (reason, log)
    assert "6 frames, expected 3" in log
    nonfinite_lines = [line for line in log.splitlines() if "non-finite values: run=r rank=0 step=1 count=3" in line]
    assert len(nonfinite_lines) == 1, log


def test_flood_of_bad_messages_logs_a_bounded_number_of_lines(running_agent):
    with Pusher(running_agent.stats_endpoint) as push:
        for _ in range(300):
            push.send([b"garbage"])
        push.send(make_frames(scalars={"loss": 0.5}))
        scrape = running_agent.wait_for(received(301))
    assert scrape.value("sentinel_agent_rejected_messages_total", reason="frame_count") == 300
    assert scrape.value("sentinel_loss") == 0.5
    assert running_agent.log().count("reason=frame_count") == 10


def test_burst_of_fuzzed_messages_leaves_the_agent_up_and_counts_each_by_reason(start_agent):
    """2,000 mutated messages (benchmarks/fuzz.py) over TCP: the agent's counters match the prediction."""
    agent = start_agent(config={"limits": {"max_message_bytes": fuzz.STATS_MAX_BYTES}})
    rng = random.Random(2024)
    layouts, cache, expected = fuzz.base_layouts(rng), {}, Counter()
    with Pusher(agent.stats_endpoint) as push:
        for _ in range(2000):
            frames = fuzz.mutate_stats(rng, layouts)
            try:
                decode(frames, cache, max_bytes=fuzz.STATS_MAX_BYTES, max_layouts=256)
                expected["accepted"] += 1
            except ProtocolError as exc:
                expected[exc.reason] += 1
            push.send(frames)
        push.send(make_frames(run="after-burst", scalars={"loss": 0.75}))
        scrape = agent.wait_for(received(2001), timeout=60)
    assert agent.alive
    rejected = {lab["reason"]: v for lab, v in scrape.samples("sentinel_agent_rejected_messages_total") if v}
    assert rejected == {reason: n for reason, n in expected.items() if reason != "accepted"}
    assert len(rejected) >= 6 and expected["accepted"] > 0
    assert scrape.value("sentinel_loss", run="after-burst", rank=0) == 0.75
    log = agent.log()
    assert "Traceback" not in log and "internal error" not in log
    assert sum(log.count(f"reason={reason} ") for reason in REJECT_REASONS) <= 10 * len(REJECT_REASONS)


def test_sigterm_stops_cleanly(running_agent):
    assert running_agent.ready_path.exists()
    assert running_agent.stop() == 0
    log = running_agent.log()
    assert "sentinel agent listening: stats=tcp://127.0.0.1:" in log
    assert "sentinel agent stopped" in log and "Traceback" not in log
    assert not running_agent.ready_path.exists()


def test_restart_reuses_ports_and_the_trainer_socket_reconnects(running_agent):
    endpoint, url = running_agent.stats_endpoint, running_agent.metrics_url
    with Pusher(endpoint) as push:
        push.send(make_frames(step=1, scalars={"loss": 1.0}))
        running_agent.wait_for(lambda s: s.value("sentinel_loss") == 1.0)
        old_pid = running_agent.pid
        running_agent.kill()
        running_agent.restart()
        assert (running_agent.stats_endpoint, running_agent.metrics_url) == (endpoint, url)
        assert running_agent.pid != old_pid
        assert running_agent.scrape().value("sentinel_agent_received_messages_total") == 0  # a new process
        push.send(make_frames(step=2, scalars={"loss": 2.0}))
        scrape = running_agent.wait_for(lambda s: s.value("sentinel_loss") == 2.0)
    assert scrape.value("sentinel_training_step") == 2


_CWD = tempfile.TemporaryDirectory(prefix="sentinel-bad-input-")  # where an agent that starts keeps its state


def run_agent(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "agent", "run", "--commands-endpoint", "tcp://127.0.0.1:*", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=_CWD.name)


def test_stats_port_in_use_exits_1_with_one_line(running_agent):
    result = run_agent("--stats-endpoint", running_agent.stats_endpoint, "--metrics-port", "0")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "cannot bind stats endpoint" in line and "Address already in use" in line


def test_metrics_port_in_use_exits_1_with_one_line(running_agent):
    port = running_agent.metrics_url.rsplit(":", 1)[1].split("/")[0]
    result = run_agent("--stats-endpoint", "tcp://127.0.0.1:*", "--metrics-port", port)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "cannot serve metrics" in line and "in use" in line


def test_unauthenticated_non_loopback_address_is_refused_with_exit_2(tmp_path):
    (tmp_path / "agent.yaml").write_text("security: {insecure: true}\n")
    result = run_agent(
        "--stats-endpoint", "tcp://0.0.0.0:*", "--metrics-port", "0", "--config", str(tmp_path / "agent.yaml")
    )
    assert result.returncode == 2
    assert "security.allow_insecure_remote" in result.stderr and "Traceback" not in result.stderr
