"""What a run report reads: the agent's ``events.jsonl`` and its ``stats-<run>.jsonl`` recordings.

Everything is read from disk alone, after the run, and nothing in the input can stop the
report: a line that is not JSON, a file that is neither an event log nor a recording, a
recording cut short, all become notes in the report.  Only the statistics a panel draws are
kept (``KEPT_STATS`` per tensor or module, every scalar), so memory follows the recording's
bounded size (``recording.max_file_bytes x recording.max_files`` per run).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.events import EVENTS_VERSION, read_events
from agent.recording import FORMAT, RecordingError, read_recording, rotation_sets

KEPT_STATS = ("update_ratio", "adam_eps", "wesar_gate", "out_rms", "attn_logit_max")
MAX_NOTES = 50


@dataclass
class StatSeries:
    """One per-tensor (or per-module) statistic over the messages that carried it."""

    rows: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    columns: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (row indices, float32 values)
    _index: dict[str, int] = field(default_factory=dict)
    _rows_of: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)

    def add(self, step: int, epoch: int, names: tuple[str, ...], values: np.ndarray) -> None:
        idx = self._rows_of.get(names)
        if idx is None:
            for name in names:
                if name not in self._index:
                    self._index[name] = len(self.rows)
                    self.rows.append(name)
            idx = self._rows_of[names] = np.asarray([self._index[n] for n in names], dtype=np.intp)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.columns.append((idx, np.asarray(values, dtype=np.float32)))

    def matrix(self, columns: list[int] | None = None) -> np.ndarray:
        """rows x messages (or the given message indices), float32, NaN where a message did not carry the row."""
        picked = range(len(self.columns)) if columns is None else columns
        out = np.full((len(self.rows), len(picked)), np.nan, dtype=np.float32)
        for j, k in enumerate(picked):
            idx, values = self.columns[k]
            out[idx, j] = values
        return out


@dataclass
class RunData:
    """Everything the report knows about one run, in arrival order."""

    run: str
    rank: int | None = None
    steps: list[int] = field(default_factory=list)  # per message with scalars, primary rank
    epochs: list[int] = field(default_factory=list)  # timeline: +1 each time the step went back
    scalars: dict[str, list[float | None]] = field(default_factory=dict)  # per entry of steps; None: absent
    stats: dict[str, StatSeries] = field(default_factory=dict)
    risk: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    messages: int = 0
    ranks: set[int] = field(default_factory=set)
    _last_step: int | None = None
    _epoch: int = 0

    def add_message(self, msg) -> None:
        self.messages += 1
        if self._last_step is not None and msg.step < self._last_step:
            self._epoch += 1
        self._last_step = msg.step
        if msg.layout.scalars:
            n = len(self.steps)
            self.steps.append(msg.step)
            self.epochs.append(self._epoch)
            for name, value in zip(msg.layout.scalars, msg.scalars.tolist()):
                values = self.scalars.get(name)
                if values is None:
                    values = self.scalars[name] = [None] * n
                values.append(value)
            for values in self.scalars.values():
                if len(values) < n + 1:
                    values.append(None)
        for c, stat in enumerate(msg.layout.stats):
            if stat in KEPT_STATS and msg.layout.tensors:
                self.stats.setdefault(stat, StatSeries()).add(
                    msg.step, self._epoch, msg.layout.tensors, msg.matrix[:, c]
                )

    def scalar(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(steps, epochs, values) of the messages that carried ``name``; None if none did."""
        values = self.scalars.get(name)
        if values is None:
            return None
        keep = [i for i, v in enumerate(values) if v is not None]
        if not keep:
            return None
        idx = np.asarray(keep)
        return (
            np.asarray(self.steps)[idx],
            np.asarray(self.epochs)[idx],
            np.asarray([values[i] for i in keep], dtype=np.float64),
        )


@dataclass
class ReportInput:
    """The runs found in the given paths, with what could not be read."""

    runs: dict[str, RunData] = field(default_factory=dict)
    events_files: list[Path] = field(default_factory=list)
    recording_files: list[Path] = field(default_factory=list)
    global_events: list[dict] = field(default_factory=list)  # agent_start and records without a run
    notes: list[str] = field(default_factory=list)
    skipped_lines: int = 0

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("... further notes left out")

    def run_data(self, run: str) -> RunData:
        data = self.runs.get(run)
        if data is None:
            data = self.runs[run] = RunData(run)
        return data


def _kind(path: Path) -> str | None:
    """'recording', 'events' or None, from the first non-empty line."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    break
            else:
                return "empty"
    except OSError:
        return None
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict):
        return None
    if head.get("format") == FORMAT:
        return "recording"
    if head.get("v") == EVENTS_VERSION and isinstance(head.get("type"), str):
        return "events"
    return None


def _candidates(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
    if not files:  # an agent's working directory: the state directory is one level down
        files = sorted(p for p in path.glob("*/*.jsonl") if p.is_file())
    return files


def read_events_tolerant(path: Path, data: ReportInput) -> list[dict]:
    def skipped(why: str) -> None:
        data.skipped_lines += 1
        data.note(why)

    return list(read_events(path, on_skip=skipped))


def load(paths: Iterable[str | Path], *, run: str | None = None) -> ReportInput:
    """Read every events file and recording in ``paths`` (files, or directories holding them).

    Raises FileNotFoundError for a path that does not exist; anything wrong inside the files
    becomes a note.
    """
    data = ReportInput()
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        files += [f for f in _candidates(p) if f not in files]
    recordings = []
    for f in files:
        kind = _kind(f)
        if kind == "recording":
            recordings.append(f)
        elif kind == "events":
            data.events_files.append(f)
        elif kind == "empty":
            data.note(f"{f}: empty, left out")
        else:
            data.note(f"{f}: neither an events file nor a statistics recording (first line unreadable), left out")
    for group in rotation_sets(recordings).values():
        _load_recordings(group, data, run)
    for f in data.events_files:
        for rec in read_events_tolerant(f, data):
            name = rec.get("run")
            if not isinstance(name, str):
                data.global_events.append(rec)
            elif run is None or name == run:
                data.run_data(name).events.append(rec)
    for rd in data.runs.values():
        rd.events.sort(key=lambda r: r.get("time", 0) if isinstance(r.get("time"), (int, float)) else 0)
    data.global_events.sort(key=lambda r: r.get("time", 0) if isinstance(r.get("time"), (int, float)) else 0)
    return data


def _load_recordings(group: list[Path], data: ReportInput, run: str | None) -> None:
    skipped: list[str] = []
    risk: list[dict] = []
    for path in group:
        try:
            for r in read_recording([path], skipped=skipped, risk=risk):
                m = r.message
                if run is not None and m.run != run:
                    continue
                rd = data.run_data(m.run)
                rd.ranks.add(m.rank)
                if rd.rank is None or m.rank < rd.rank:  # the lowest rank is the run's voice, as in the agent
                    fresh = RunData(m.run, rank=m.rank, risk=rd.risk, events=rd.events, ranks=rd.ranks)
                    rd = data.runs[m.run] = fresh
                if m.rank == rd.rank:
                    rd.add_message(m)
        except (OSError, RecordingError) as exc:
            data.note(f"{path}: {exc}; left out")
            continue
        data.recording_files.append(path)
    data.skipped_lines += len(skipped)
    for line in skipped:
        data.note(f"{line}; left out")
    for r in risk:
        if run is None or r["run"] == run:
            data.run_data(r["run"]).risk.append(r)
