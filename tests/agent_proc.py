"""Test helpers around a real ``sentinel-agent`` process: start it, feed it, scrape it.

The agent runs as users run it (``python -m agent run``) and tells us its addresses through
``--ready-file``; statistics reach it through a real ZeroMQ PUSH socket on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from agent import protocol
from agent.events import read_events
from agent.spawn import AgentProcess
from sentinel.discovery import discovery_path, read_keys


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], ready_url: str, log: Path, timeout: float = 30.0) -> subprocess.Popen:
    """Start a server process and return once ``ready_url`` answers 2xx; fails the test with its log if not."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fetch(ready_url)
            return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{cmd[0]} did not start:\n{log.read_text()}")
        time.sleep(0.2)


def start_prometheus(workdir: Path, targets: Sequence[str], **config: object) -> tuple[subprocess.Popen, str]:
    """Debian's Prometheus on loopback scraping ``targets`` (job ``sentinel-agent``) every second,
    with ``config`` added to its configuration (``rule_files``, ``alerting``...); (process, URL)."""
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        **config,
        "scrape_configs": [{"job_name": "sentinel-agent", "static_configs": [{"targets": list(targets)}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = serve(
        [
            require_binary("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}/-/ready",
        workdir / "prometheus.log",
    )
    return proc, f"http://127.0.0.1:{port}"


def require_binary(name: str) -> str:
    """Path of executable ``name``; skips the test if it is missing, unless the environment sets
    SENTINEL_REQUIRE_PROMETHEUS=1 (CI), where a missing binary is a failure."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("SENTINEL_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(message + "; SENTINEL_REQUIRE_PROMETHEUS=1 requires it")
        pytest.skip(message)
    return path


def make_frames(
    *,
    run: str = "run",
    rank: int = 0,
    step: int = 0,
    scalars: dict[str, float] | None = None,
    stats: Sequence[str] = (),
    tensors: Sequence[str] = (),
    matrix: np.ndarray | Sequence | None = None,
    sent: int | None = None,
    dropped: int = 0,
    seq: int | None = None,
    time_: float | None = None,
    roles: Sequence[str] = (),
) -> list[bytes]:
    """The three frames of a valid v1 message; ``matrix`` has shape (len(tensors), len(stats))."""
    scalars = scalars or {}
    layout = protocol.Layout(tuple(scalars), tuple(stats), tuple(tensors), tuple(roles))
    raw = layout.encode()
    if matrix is None:
        matrix = np.zeros((len(tensors), len(stats)))
    values = np.concatenate(
        [
            np.asarray(list(scalars.values()), dtype=np.float64),
            np.asarray(matrix, dtype=np.float64).reshape(-1),
        ]
    )
    header = protocol.encode_header(
        run=run,
        rank=rank,
        step=step,
        time=time.time() if time_ is None else time_,
        seq=step + 1 if seq is None else seq,
        sent=step + 1 if sent is None else sent,
        dropped=dropped,
        layout=protocol.layout_id(raw),
    )
    return [header, raw, values.astype(protocol.DTYPE).tobytes()]


def header_dict(frames: list[bytes]) -> dict:
    return json.loads(frames[0])


def with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    """``frames`` with header fields replaced (a field set to None is removed)."""
    header = {**header_dict(frames), **changes}
    header = {k: v for k, v in header.items() if v is not None}
    return [json.dumps(header).encode(), *frames[1:]]


class Scrape(dict):
    """Parsed /metrics: sample name -> list of (labels, value)."""

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.get(name, [])

    def value(self, metric: str, /, **labels: object) -> float | None:
        """The value of the one sample of ``metric`` whose labels include ``labels``, or None."""
        found = [v for lab, v in self.samples(metric) if all(lab.get(k) == str(x) for k, x in labels.items())]
        if len(found) > 1:
            raise AssertionError(f"{len(found)} samples of {metric} match {labels}")
        return found[0] if found else None


def parse_metrics(text: str) -> Scrape:
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def discovered_keys(endpoint: str) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) a trainer of this user finds for ``endpoint`` (sentinel/discovery.py)."""
    return read_keys(discovery_path(endpoint))


class Pusher:
    """A trainer-like PUSH socket connected to the agent, with the keys a trainer would discover
    (``curve`` other keys; ``plain=True`` none, as an unauthenticated process would)."""

    def __init__(self, endpoint: str, *, curve: tuple[bytes, bytes, bytes] | None = None, plain: bool = False):
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if not plain:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve or discovered_keys(
                endpoint
            )
        self.sock.connect(endpoint)

    def send(self, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart(list(frames))

    def close(self) -> None:
        self.sock.close()
        self.context.term()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def applied(acks: list[dict]) -> list[dict]:
    """The 'applied' acks; the agent may resend before the first ack, and the resend is acked 'duplicate'."""
    assert {a["status"] for a in acks} <= {"applied", "duplicate"}, acks
    return [a for a in acks if a["status"] == "applied"]


def trainer_config(agent: AgentProcess, run: str, **extra: object) -> dict:
    """A trainer's sentinel config publishing to ``agent`` and taking its commands, with the guard
    on so that a step with an injected NaN is itself skipped."""
    return {
        "run": run,
        "publish": {"endpoint": agent.stats_endpoint},
        "control": {"endpoint": agent.commands_endpoint},
        "optim": {"guard": {"enabled": True}},
        **extra,
    }


def nonfinite_policy(action: str, **args: object) -> dict:
    """An agent config whose only rule answers a critical ``nonfinite`` detection with ``action``."""
    return {"policy": {"rules": [{"detector": "nonfinite", "severity": "critical", "action": action, "args": args}]}}


class AgentProc(AgentProcess):
    """The agent process of agent.spawn, plus parsed scrapes and its event log for assertions."""

    def scrape(self) -> Scrape:
        return parse_metrics(fetch(self.metrics_url))

    def events(self) -> list[dict]:
        """The records of its events.jsonl so far (a line still being written is left out)."""
        return list(read_events(self.events_path, on_skip=lambda _: None))

    def acks(self, action: str) -> list[dict]:
        """The trainer's acks of the commands of ``action`` the agent decided on."""
        found = self.events()
        ids = {
            c["id"] for e in found if e["type"] == "decision" for c in e.get("commands", []) if c["action"] == action
        }
        return [e for e in found if e["type"] == "ack" and e.get("id") in ids]

    def wait_acked(self, action: str, timeout: float = 10.0) -> list[dict]:
        """``acks(action)`` once there is one; fails with the agent's log otherwise."""
        deadline = time.monotonic() + timeout
        while not (found := self.acks(action)):
            assert time.monotonic() < deadline, f"no ack for {action}; agent log:\n{self.log()}"
            time.sleep(0.05)
        return found

    def wait_for(self, predicate: Callable[[Scrape], bool], timeout: float = 10.0) -> Scrape:
        """Scrape until ``predicate`` holds; fails with the last scrape and the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            if predicate(scrape):
                return scrape
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met after {timeout} s; agent log:\n{self.log()}")
            time.sleep(0.05)
