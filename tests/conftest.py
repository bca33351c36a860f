"""Shared fixtures: a real agent subprocess, started per test and always terminated."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Agents advertise their CURVE keys in a discovery directory (docs/security.md) that trainers,
# in this process and in every child, find on their own: the suite's lives apart from ~/.local.
_DISCOVERY = tempfile.TemporaryDirectory(prefix="sentinel-discovery-")
os.environ.setdefault("SENTINEL_DISCOVERY_DIR", _DISCOVERY.name)

from agent_proc import AgentProc, require_binary  # noqa: E402

__all__ = ["require_binary"]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """Factory: ``start_agent(config=None, args=())`` starts an agent on free loopback ports and
    returns its AgentProc once it is listening.  Every agent is stopped at teardown."""
    procs: list[AgentProc] = []

    def start(**kwargs) -> AgentProc:
        proc = AgentProc(tmp_path / f"agent{len(procs)}", **kwargs)
        procs.append(proc)
        return proc.start(timeout=20.0)

    yield start
    for proc in procs:
        proc.stop(timeout=5.0)


@pytest.fixture
def running_agent(start_agent: Callable[..., AgentProc]) -> AgentProc:
    """An agent with the default configuration on free loopback ports."""
    return start_agent()
