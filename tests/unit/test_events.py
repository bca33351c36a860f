"""The event log: append-only JSON lines, strict JSON even for NaN, survives a torn last line."""

from __future__ import annotations

import json
import math

from agent.events import EventLog, read_events


def test_records_are_appended_never_rewritten(tmp_path):
    path = tmp_path / "state" / "events.jsonl"
    log = EventLog(path, clock=lambda: 12.5)
    assert log.open() == [] and path.exists()
    log.append({"type": "decision", "id": "d-1", "value": math.nan, "evidence": {"z": math.inf, "x": [1, -math.inf]}})
    log.close()
    first = path.read_bytes()
    log = EventLog(path)
    [old] = log.open()
    assert old == {"v": 1, "type": "decision", "time": 12.5, "id": "d-1", "value": "NaN",
                   "evidence": {"z": "Infinity", "x": [1, "-Infinity"]}}  # fmt: skip
    log.append({"type": "ack", "id": "c-1"})
    log.close()
    data = path.read_bytes()
    assert data.startswith(first)
    for line in data.decode().splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_clean(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.open()
    log.append({"type": "decision", "id": "d-1"})
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"v":1,"type":"decis')  # the agent died mid-write
    log = EventLog(path)
    assert [r["id"] for r in log.open()] == ["d-1"]
    log.append({"type": "decision", "id": "d-2"})
    log.close()
    assert [r["id"] for r in read_events(path)] == ["d-1", "d-2"]
    assert "not JSON" in caplog.text


def test_unknown_versions_and_garbage_are_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"v":2,"type":"decision"}\n[1,2]\n\n{"v":1,"type":"rewind","run":"r"}\n')
    assert [r["type"] for r in read_events(path)] == ["rewind"]


def test_memory_mode_writes_nothing(tmp_path):
    log = EventLog(None, clock=lambda: 1.0)
    assert log.open() == []
    log.append({"type": "decision", "id": "x"})
    assert log.records[0]["id"] == "x" and list(tmp_path.iterdir()) == []
