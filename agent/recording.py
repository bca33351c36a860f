"""Recordings of the statistics the agent accepted, for ``sentinel-agent replay`` and run reports.

One JSON-lines file per run, ``<recording dir>/stats-<run>.jsonl`` (the run name made safe
for a file name, see ``file_stem``), rotated at ``recording.max_file_bytes`` into
``stats-<run>.1.jsonl`` (newest) ... ``stats-<run>.<max_files - 1>.jsonl`` (oldest), so a run
never holds more than ``max_file_bytes x max_files`` bytes of disk.  Each file stands alone:

1. ``{"type": "recording", "format": "sentinel-stats", "v": 1, "run": ..., "created": ...}``
2. ``{"type": "layout", "id": "<16 hex>", "scalars": [...], "stats": [...], "tensors": [...]}``
   before the first message that uses a layout (the id is the protocol's layout id), with
   ``"roles": [...]`` (one per tensor) when the layout carries roles;
3. ``{"type": "stats", "run", "rank", "step", "time", "received", "seq", "sent", "dropped",
   "layout": "<id>", "scalars": [...], "matrix": "<base64>"}``: ``scalars`` in layout order,
   with non-finite values as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
   ``matrix`` the tensors x stats float32 little-endian row-major bytes in base64 (``""``
   when the layout has none), exact and compact;
4. ``{"type": "risk", "run", "rank", "step", "time", "score", "predictor", "layer", "eta",
   "explanation"}`` after a message of the run's primary rank, when the agent's risk score, its
   source or an ETA (``eta``: steps per trend predictor) changed since the file's previous risk
   line: the value of ``sentinel_spike_risk`` holds until the next one (run reports, docs/report.md).

Lines are flushed as written (not fsynced: a recording is evidence, not the audit trail).  A
write error (disk full) is logged and counted; the agent goes on without the recording.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.events import plain
from sentinel_contract.protocol import DTYPE, Layout, StatsMessage, layout_id

logger = logging.getLogger("sentinel.agent")

FORMAT = "sentinel-stats"
RECORDING_VERSION = 1
MAX_OPEN_FILES = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


_ROTATED = re.compile(r"^(?P<stem>stats-.+?)(?:\.(?P<index>\d+))?\.jsonl$")


def rotation_sets(paths: Iterable[str | Path]) -> dict[tuple[Path, str], list[Path]]:
    """Recording files grouped per run, keyed by (directory, file stem), each group oldest first
    (``stats-r.2.jsonl``, ``stats-r.1.jsonl``, ``stats-r.jsonl``); a name outside the scheme is a group of its own."""
    sets: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    for path in map(Path, paths):
        m = _ROTATED.match(path.name)
        key = (path.parent, m["stem"] if m else path.name)
        sets.setdefault(key, []).append((int(m["index"] or 0) if m else 0, path))
    return {key: [p for _, p in sorted(files, key=lambda f: -f[0])] for key, files in sets.items()}


def file_stem(run: str) -> str:
    """``stats-<run>`` with characters other than letters, digits, ``._-`` replaced by ``_``;
    names that had to change (or are long) get 8 hex digits of their hash appended.  A name
    ending in ``.<digits>`` is changed too, so that it never reads as another run's rotated
    file (``stats-<run>.<n>.jsonl``)."""
    safe = _UNSAFE.sub("_", run)[:80].lstrip(".") or "run"
    safe = re.sub(r"\.(\d+)$", r"_\1", safe)
    if safe != run:
        safe += "-" + hashlib.blake2b(run.encode("utf-8", "replace"), digest_size=4).hexdigest()
    return f"stats-{safe}"


class _File:
    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run
        self.f = open(path, "ab")  # noqa: SIM115 - kept open across messages, closed by close()
        self.size = self.f.tell()
        self.layouts: set[str] = set()
        self.last_risk: tuple | None = None
        if self.size == 0:
            self._line(
                {"type": "recording", "format": FORMAT, "v": RECORDING_VERSION, "run": run, "created": time.time()}
            )
        else:
            self._find_layouts()

    def _find_layouts(self) -> None:
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.startswith(b'{"type":"layout"'):
                    try:
                        self.layouts.add(json.loads(raw)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue

    def _line(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n").encode()
        self.f.write(data)
        self.size += len(data)

    def write(self, msg: StatsMessage, received_at: float, lid: str) -> None:
        if lid not in self.layouts:
            lay = msg.layout
            line = {"type": "layout", "id": lid, "scalars": list(lay.scalars), "stats": list(lay.stats),
                    "tensors": list(lay.tensors)}  # fmt: skip
            if lay.roles:
                line["roles"] = list(lay.roles)
            self._line(line)
            self.layouts.add(lid)
        head = {
            "type": "stats",
            "run": msg.run,
            "rank": msg.rank,
            "step": msg.step,
            "time": msg.time,
            "received": received_at,
            "seq": msg.seq,
            "sent": msg.sent,
            "dropped": msg.dropped,
            "layout": lid,
            "scalars": plain([float(v) for v in msg.scalars]),
        }
        # The same bytes as json.dumps with "matrix" as the last key, without JSON-scanning the
        # base64 text (the bulk of the line for a large model; base64 needs no escaping).
        text = json.dumps(head, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        matrix = base64.b64encode(np.ascontiguousarray(msg.matrix, dtype=DTYPE).tobytes())
        data = b"".join((text[:-1].encode(), b',"matrix":"', matrix, b'"}\n'))
        self.f.write(data)
        self.size += len(data)
        self.f.flush()

    def write_risk(self, risk: dict) -> bool:
        key = (risk["score"], risk.get("predictor"), risk.get("layer"), tuple(sorted(risk["eta"].items())))
        if key == self.last_risk:
            return False
        self._line({"type": "risk", **plain(risk)})
        self.f.flush()
        self.last_risk = key
        return True

    def close(self) -> None:
        self.f.close()


class StatsRecorder:
    """Appends accepted messages to per-run files; bounded in disk and open files."""

    def __init__(self, directory: str | Path, *, max_file_bytes: int, max_files: int):
        self.directory = Path(directory)
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.recorded = 0
        self.errors = 0
        self.opened = 0  # files opened (each starts without a risk line)
        self._files: OrderedDict[str, _File] = OrderedDict()
        self._layout_ids: dict[Layout, str] = {}

    def path_for(self, run: str, index: int = 0) -> Path:
        stem = file_stem(run)
        return self.directory / (f"{stem}.jsonl" if index == 0 else f"{stem}.{index}.jsonl")

    def _layout_id(self, layout: Layout) -> str:
        lid = self._layout_ids.get(layout)
        if lid is None:
            if len(self._layout_ids) > 4096:
                self._layout_ids.clear()
            lid = self._layout_ids[layout] = layout_id(layout.encode())
        return lid

    def record(self, msg: StatsMessage, received_at: float) -> bool:
        """Append one message; False (logged, counted) if the disk refused it."""
        try:
            f = self._open(msg.run)
            f.write(msg, received_at, self._layout_id(msg.layout))
            if f.size >= self.max_file_bytes:
                self._rotate(msg.run)
            self.recorded += 1
            return True
        except OSError as exc:
            self.errors += 1
            self._drop(msg.run)
            if self.errors == 1 or self.errors % 1000 == 0:
                logger.error("cannot record statistics of run %s: %s (%d errors so far)", msg.run, exc, self.errors)
            return False

    def record_risk(
        self,
        run: str,
        rank: int,
        step: int,
        time_: float,
        *,
        score: float,
        predictor: str | None,
        layer: str | None,
        eta: dict[str, float],
        explanation: str,
    ) -> bool:
        """Append a ``risk`` line if anything changed since the file's last one; False if not written."""
        risk = {"run": run, "rank": rank, "step": step, "time": time_, "score": round(float(score), 4)}
        risk |= {"predictor": predictor, "layer": layer}
        risk["eta"] = {k: round(float(v), 1) for k, v in sorted(eta.items()) if math.isfinite(v)}
        if risk["score"] > 0:
            risk["explanation"] = explanation[:300]
        try:
            f = self._open(run)
            if not f.write_risk(risk):
                return False
            if f.size >= self.max_file_bytes:
                self._rotate(run)
            return True
        except OSError as exc:
            self.errors += 1
            self._drop(run)
            if self.errors == 1 or self.errors % 1000 == 0:
                logger.error("cannot record the risk of run %s: %s (%d errors so far)", run, exc, self.errors)
            return False

    def _open(self, run: str) -> _File:
        f = self._files.get(run)
        if f is not None:
            self._files.move_to_end(run)
            return f
        self.directory.mkdir(parents=True, exist_ok=True)
        while len(self._files) >= MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            old.close()
        f = self._files[run] = _File(self.path_for(run), run)
        self.opened += 1
        return f

    def _drop(self, run: str) -> None:
        f = self._files.pop(run, None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _rotate(self, run: str) -> None:
        self._drop(run)
        oldest = self.path_for(run, self.max_files - 1)
        if self.max_files == 1:
            oldest.unlink(missing_ok=True)
            return
        oldest.unlink(missing_ok=True)
        for i in range(self.max_files - 2, -1, -1):
            src = self.path_for(run, i)
            if src.exists():
                os.replace(src, self.path_for(run, i + 1))

    def close(self) -> None:
        for run in list(self._files):
            self._drop(run)


@dataclass(frozen=True)
class Recorded:
    message: StatsMessage
    received_at: float


class RecordingError(ValueError):
    """The file is not a sentinel statistics recording."""


def _number(v: object) -> float:
    if isinstance(v, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError("not a number")


def read_recording(
    paths: Iterable[str | Path], *, skipped: list[str] | None = None, risk: list[dict] | None = None
) -> Iterator[Recorded]:
    """Messages of one or more recording files, in file order; bad lines are skipped (and
    described in ``skipped`` when given).  Raises RecordingError for a file that is not one.
    ``risk``, when given, collects the ``risk`` lines (dicts as written) as they are passed."""
    for path in paths:
        layouts: dict[str, Layout] = {}
        with open(path, "rb") as f:
            first = f.readline()
            try:
                head = json.loads(first)
            except (ValueError, UnicodeDecodeError):
                head = None
            if not isinstance(head, dict) or head.get("format") != FORMAT:
                raise RecordingError(f"{path} is not a {FORMAT} recording (first line: {first[:80]!r})")
            if head.get("v") != RECORDING_VERSION:
                raise RecordingError(
                    f"{path}: recording version {head.get('v')!r}, this agent reads {RECORDING_VERSION}"
                )
            for number, raw in enumerate(f, 2):
                try:
                    rec = json.loads(raw)
                    if rec["type"] == "layout":
                        layouts[rec["id"]] = _layout_line(rec)
                        continue
                    if rec["type"] == "risk" and risk is not None:
                        risk.append(_risk_line(rec))
                    if rec["type"] != "stats":
                        continue
                    layout = layouts[rec["layout"]]
                    scalars = np.array([_number(v) for v in rec["scalars"]], dtype=DTYPE)
                    matrix = np.frombuffer(base64.b64decode(rec["matrix"], validate=True), dtype=DTYPE)
                    if len(scalars) != len(layout.scalars) or matrix.size != len(layout.tensors) * len(layout.stats):
                        raise ValueError("sizes do not match the layout")
                    msg = StatsMessage(
                        run=str(rec["run"]),
                        rank=int(rec["rank"]),
                        step=int(rec["step"]),
                        time=float(rec["time"]),
                        seq=int(rec.get("seq", 0)),
                        sent=int(rec.get("sent", 0)),
                        dropped=int(rec.get("dropped", 0)),
                        layout=layout,
                        scalars=scalars,
                        matrix=matrix.reshape(len(layout.tensors), len(layout.stats)),
                    )
                    yield Recorded(msg, float(rec.get("received", msg.time)))
                except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    if skipped is not None:
                        skipped.append(f"{path}:{number}: {type(exc).__name__}: {exc}"[:300])


def _layout_line(rec: dict) -> Layout:
    names = [rec[k] for k in ("scalars", "stats", "tensors")]
    roles = rec.get("roles", [])
    if not all(isinstance(x, list) and all(isinstance(n, str) for n in x) for x in (*names, roles)):
        raise TypeError("layout names are not lists of strings")
    return Layout(*map(tuple, names), roles=tuple(roles))  # a roles list of the wrong length: ValueError


def _risk_line(rec: dict) -> dict:
    eta = rec.get("eta") or {}
    if not isinstance(eta, dict):
        raise TypeError("eta is not an object")
    return {
        "run": str(rec["run"]),
        "rank": int(rec.get("rank", 0)),
        "step": int(rec["step"]),
        "time": _number(rec.get("time", math.nan)),
        "score": _number(rec["score"]),
        "predictor": rec.get("predictor"),
        "layer": rec.get("layer"),
        "eta": {str(k): _number(v) for k, v in eta.items()},
        "explanation": str(rec.get("explanation", "")),
    }
