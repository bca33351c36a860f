"""Test helper: worker processes of a distributed test, one per rank, on a fresh loopback rendezvous port.

A distributed test runs its own file as a script, ``python SCRIPT RANK PORT ARGS...``, once per
rank; each rank logs to ``log_dir/rank<r>.log``, and every worker still running when the block
ends is killed, so a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from agent_proc import free_port


class Ranks:
    def __init__(self, script: Path, *args: object, log_dir: Path, n: int = 2, cwd: Path | None = None):
        self.script, self.args, self.log_dir, self.n, self.cwd = script, args, log_dir, n, cwd
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []

    def __enter__(self) -> Ranks:
        self._logs = [(self.log_dir / f"rank{r}.log").open("w") for r in range(self.n)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(self.script), str(r), str(self.port), *map(str, self.args)],
                stdout=self._logs[r],
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
            )
            for r in range(self.n)
        ]
        return self

    def wait(self, timeout: float) -> list[int]:
        """Every worker's exit code, waiting at most ``timeout`` seconds for all of them together."""
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def log(self) -> str:
        """Every rank's log, rank 0 first."""
        return "\n".join((self.log_dir / f"rank{r}.log").read_text() for r in range(self.n))

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for f in self._logs:
            f.close()
