"""Recordings: exact round trip of scalars and matrices (NaN included), rotation bounds the disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from agent_proc import make_frames

from agent.protocol import decode
from agent.recording import RecordingError, StatsRecorder, file_stem, read_recording

LAYOUTS: dict = {}


def msg(step, run="r", **kw):
    kw.setdefault("scalars", {"loss": 3.0 + step, "lr": 1e-3})
    return decode(make_frames(run=run, step=step, **kw), LAYOUTS, max_bytes=1 << 24)


def test_round_trip_is_exact(tmp_path):
    rec = StatsRecorder(tmp_path, max_file_bytes=1 << 20, max_files=2)
    matrix = np.array([[1.0, np.nan], [np.inf, 1e-30]])
    sent = [
        msg(0, scalars={"loss": math.nan, "lr": -math.inf}, stats=("a", "b"), tensors=("w1", "w2"), matrix=matrix),
        msg(1),
        msg(2, stats=("a", "b"), tensors=("w1", "w2"), matrix=matrix * 2),
    ]
    for i, m in enumerate(sent):
        assert rec.record(m, 100.0 + i)
    rec.close()
    got = list(read_recording([tmp_path / "stats-r.jsonl"]))
    assert [g.received_at for g in got] == [100.0, 101.0, 102.0]
    for m, g in zip(sent, got):
        assert (g.message.run, g.message.step, g.message.layout) == (m.run, m.step, m.layout)
        np.testing.assert_array_equal(g.message.scalars, m.scalars)
        np.testing.assert_array_equal(g.message.matrix, m.matrix)
    text = (tmp_path / "stats-r.jsonl").read_text()
    assert text.count('"type":"layout"') == 2 and "NaN" in text


def test_layout_roles_are_recorded_and_read_back(tmp_path):
    rec = StatsRecorder(tmp_path, max_file_bytes=1 << 20, max_files=2)
    tensors, roles = ("h.0.attn.qkv.weight", "h.0.ln1.weight", "h.0.ln1.bias"), ("qkv", "norm", "bias")
    sent = [msg(0, stats=("a",), tensors=tensors, roles=roles, matrix=[[1.0], [2.0], [3.0]]),
            msg(1, stats=("a",), tensors=tensors, matrix=[[1.0], [2.0], [3.0]])]  # fmt: skip
    for i, m in enumerate(sent):
        assert rec.record(m, float(i))
    rec.close()
    got = [r.message.layout for r in read_recording([tmp_path / "stats-r.jsonl"])]
    assert got == [m.layout for m in sent] and got[0].roles == roles and got[1].roles == ()
    lines = (tmp_path / "stats-r.jsonl").read_text().splitlines()
    layouts = [json.loads(line) for line in lines if '"type":"layout"' in line]
    assert [la.get("roles") for la in layouts] == [list(roles), None]  # no key at all without roles


def test_rotation_keeps_at_most_max_files_each_self_contained(tmp_path):
    rec = StatsRecorder(tmp_path, max_file_bytes=4096, max_files=3)
    for step in range(300):
        rec.record(msg(step, stats=("a",), tensors=("w",), matrix=[[step]]), float(step))
    rec.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["stats-r.1.jsonl", "stats-r.2.jsonl", "stats-r.jsonl"]
    assert all((tmp_path / f).stat().st_size < 4096 + 1024 for f in files)
    paths = [tmp_path / "stats-r.2.jsonl", tmp_path / "stats-r.1.jsonl", tmp_path / "stats-r.jsonl"]
    steps = [r.message.step for r in read_recording(paths)]
    assert steps == list(range(steps[0], 300)) and steps[0] > 0  # oldest rotated away, order kept


def test_run_names_become_safe_distinct_file_names():
    assert file_stem("run-1") == "stats-run-1"
    a, b = file_stem("a/b"), file_stem("a_b")
    assert a != b and "/" not in a and a.startswith("stats-a_b-")
    assert file_stem("..").startswith("stats-") and "/" not in file_stem("../../etc")


def test_not_a_recording_and_bad_lines(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(RecordingError):
        list(read_recording([bad]))
    rec = StatsRecorder(tmp_path, max_file_bytes=1 << 20, max_files=1)
    rec.record(msg(0), 0.0)
    rec.record(msg(1), 1.0)
    rec.close()
    path = tmp_path / "stats-r.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], "garbage", lines[2][:-5], lines[3]]) + "\n")
    skipped: list[str] = []
    assert [r.message.step for r in read_recording([path], skipped=skipped)] == [1]
    assert len(skipped) == 2


def test_disk_full_is_counted_not_raised(tmp_path, caplog):
    rec = StatsRecorder(tmp_path, max_file_bytes=1 << 20, max_files=1)
    (tmp_path / "stats-r.jsonl").symlink_to("/dev/full")
    assert rec.record(msg(0), 0.0) is False and rec.errors == 1
    assert "cannot record statistics" in caplog.text


def test_a_run_named_like_a_rotated_file_keeps_its_own_recording(tmp_path) -> None:
    """Run ``sweep`` rotates into ``stats-sweep.1.jsonl``; run ``sweep.1`` must never live there."""
    from agent.warm import recording_sets

    assert file_stem("sweep.1") != "stats-sweep.1" and file_stem("sweep.1").startswith("stats-sweep_1-")
    rec = StatsRecorder(tmp_path, max_file_bytes=4096, max_files=3)
    for step in range(60):
        for run in ("sweep", "sweep.1"):
            rec.record(msg(step, run=run), float(step))
    rec.close()
    sets = recording_sets(tmp_path, max_age_seconds=60.0)
    assert sorted(sets) == sorted([file_stem("sweep"), file_stem("sweep.1")])
    assert len(sets[file_stem("sweep")]) >= 2  # rotated
    for stem, run in ((file_stem("sweep"), "sweep"), (file_stem("sweep.1"), "sweep.1")):
        runs = {r.message.run for r in read_recording(sets[stem])}
        assert runs == {run}
