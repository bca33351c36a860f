"""Start ``sentinel-agent run`` as a child process and wait until it is listening.

Used by ``sentinel demo``, the benchmarks and the tests: the agent runs the way users run
it, as its own process, and reports its addresses through ``--ready-file``.  This is the agent's
process interface (its command line, the ready file's keys, /metrics), not its code: the module
imports nothing of ``agent``, so the trainer can start an agent without importing the sidecar.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml


def _port(address: str) -> int:
    m = re.search(r":(\d+)(/|$)", address)
    if not m:
        raise ValueError(f"no port in {address!r}")
    return int(m.group(1))


class AgentProcess:
    """One ``python -m agent run`` child process, restartable on the same ports."""

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        config: dict | None = None,
        args: Sequence[str] = (),
        stats_endpoint: str = "tcp://127.0.0.1:*",
        metrics_port: int = 0,
        commands_endpoint: str | None = "tcp://127.0.0.1:*",
    ):
        self._tmp = tempfile.TemporaryDirectory(prefix="sentinel-agent-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "agent.log"
        self.ready_path = self.workdir / "ready.json"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.workdir / "agent.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
        self.args = list(args)
        self._stats_endpoint_arg = stats_endpoint
        self._metrics_port_arg = metrics_port
        self._commands_endpoint_arg = commands_endpoint
        self.proc: subprocess.Popen | None = None
        self.commands_endpoint: str | None = None
        self.events_path: str | None = None
        self.stats_endpoint = ""
        self.metrics_url = ""
        self.pid = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "agent", "run", "--stats-endpoint", self._stats_endpoint_arg]
        cmd += ["--metrics-port", str(self._metrics_port_arg), "--ready-file", str(self.ready_path)]
        if self._commands_endpoint_arg is not None:
            cmd += ["--commands-endpoint", self._commands_endpoint_arg]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.args

    def start(self, timeout: float = 30.0) -> AgentProcess:
        """Start and wait until the ready file appears; raises RuntimeError with the agent's log otherwise."""
        self.ready_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # in workdir: the default state_dir lands there
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"sentinel-agent exited with {code} before ready; log:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"sentinel-agent not ready after {timeout} s; log:\n{self.log()}")
            time.sleep(0.02)
        info = json.loads(self.ready_path.read_text())
        self.stats_endpoint, self.metrics_url, self.pid = info["stats_endpoint"], info["metrics_url"], info["pid"]
        self.commands_endpoint = info.get("commands_endpoint")
        events = info.get("events_path")
        self.events_path = str(self.workdir / events) if events else None  # the agent runs in workdir
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics_text(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return response.read().decode()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as when the node is in trouble."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 30.0) -> AgentProcess:
        """Stop if running, then start again on the same statistics and metrics ports."""
        stats_port, metrics_port = _port(self.stats_endpoint), _port(self.metrics_url)
        self.stop()
        self._stats_endpoint_arg = f"tcp://127.0.0.1:{stats_port}"
        self._metrics_port_arg = metrics_port
        if self._commands_endpoint_arg is not None and self.commands_endpoint:
            self._commands_endpoint_arg = f"tcp://127.0.0.1:{_port(self.commands_endpoint)}"
        return self.start(timeout)

    def __enter__(self) -> AgentProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
