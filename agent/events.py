"""The audit trail: an append-only JSON-lines file of everything the agent decided and why.

"The agent decides, the trainer obeys, the event log remembers": a decision is written and
fsynced, with its evidence, *before* its command leaves the agent, so a crash between the two
leaves a record of a command that may not have been sent (the restarted agent resends it,
under the same id, which the trainer deduplicates), never a command without a record.
The file is read back at start so a restarted agent does not take the same decision twice.

One UTF-8 JSON object per line, written with ``allow_nan=False`` (non-finite numbers are the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``); every record has ``v`` (1), ``type`` and
``time`` (agent clock, Unix seconds).  docs/policy.md lists the record types.  A line cut short
by a crash is skipped on reading, and the next append starts on a new line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger("sentinel.agent")

EVENTS_VERSION = 1
RECORD_TYPES = ("agent_start", "decision", "suppressed", "rewind", "sent", "ack", "undeliverable", "expired")


def plain(value: object) -> object:
    """JSON-safe copy: non-finite floats become the strings 'NaN', 'Infinity', '-Infinity'."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v):
            return v
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class EventLog:
    """Appends records to ``path`` (fsync after each); ``path=None`` keeps them in memory only
    (``sentinel-agent replay``).  Thread-safe: the receiver and the command server both write."""

    def __init__(self, path: str | Path | None, *, clock=time.time):
        self.path = None if path is None else Path(path)
        self.clock = clock
        self.records: list[dict] = []  # what this process appended (memory mode keeps everything)
        self.errors = 0
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> list[dict]:
        """Create the file (and its directory) if needed; return the records already in it."""
        if self.path is None:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = list(read_events(self.path)) if self.path.is_file() else []
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")  # a torn last line from a crash: start clean
        if created:
            _fsync_dir(self.path.parent)
        self._fd = fd
        return existing

    def append(self, record: dict) -> dict:
        """Write one record durably; raises OSError (disk full...) after counting it."""
        rec = {"v": EVENTS_VERSION, "type": record["type"], "time": self.clock(), **record}
        line = (json.dumps(plain(rec), allow_nan=False, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self.path is not None:
                if self._fd is None:
                    self.open()
                try:
                    _write_all(self._fd, line)
                    os.fsync(self._fd)
                except OSError:
                    self.errors += 1
                    raise
            self.records.append(rec)
        return rec

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_events(path: str | Path, on_skip: Callable[[str], None] | None = None) -> Iterator[dict]:
    """The records of an events file, oldest first; an unreadable line is skipped and described
    to ``on_skip`` (default: a warning in the log)."""
    skip = on_skip or logger.warning
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                skip(f"{path}:{number}: not JSON (a line cut short by a crash?), left out")
                continue
            if isinstance(rec, dict) and rec.get("v") == EVENTS_VERSION and isinstance(rec.get("type"), str):
                yield rec
            else:
                skip(f"{path}:{number}: not an event record of version {EVENTS_VERSION}, left out")
