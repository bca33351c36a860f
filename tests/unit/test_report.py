"""Run reports from files written through the real recording and event-log code: panels, notes, bad input.

Probe statistics are recorded the way the agent records them (their own layouts, rows = module
names, stats ``out_rms`` and ``attn_logit_max``), through ``StatsRecorder`` and the protocol decoder.
"""

from __future__ import annotations

import base64
import math
import re
import sys

import numpy as np
import pytest
from agent_proc import make_frames

from agent.cli import main as agent_main
from agent.config import load_config
from agent.events import EventLog
from agent.history import History
from agent.protocol import decode
from agent.recording import StatsRecorder, read_recording
from agent.report import MatplotlibMissing, ReportError, build_report, forecasts, plots
from agent.report.load import StatSeries
from agent.report.marks import marks_from_events
from agent.supervisor import Supervisor

PNG = b"\x89PNG\r\n\x1a\n"
TENSORS = ("h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.mlp.c_proj.weight", "lm_head.weight")
LINEARS = ("h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj")
ATTN = ("h.0.attn", "h.1.attn")


def _msg(layouts: dict, step: int, **kw):
    return decode(make_frames(run="r1", step=step, time_=1.0e9 + step, **kw), layouts, max_bytes=1 << 24)


def write_run(directory, *, steps=80, rollback_at=50, back_to=40, probes=True, risk=True, events=True):
    """A recorded run with a loss spike at ``rollback_at``, a rollback to ``back_to`` and probe statistics."""
    layouts: dict = {}
    rec = StatsRecorder(directory, max_file_bytes=1 << 24, max_files=2)
    rng = np.random.default_rng(0)
    order = list(range(rollback_at + 3)) + list(range(back_to, steps))
    for i, step in enumerate(order):
        spike = step >= rollback_at and i <= rollback_at + 2
        loss = 9.0 if spike else 3.0 + 2.0 * np.exp(-step / 10) + 0.05 * rng.standard_normal()
        ratio = np.array([1e-3, 0.5, 2e-3, 4e-4]) * (1 + 0.1 * rng.random(4))
        eps = np.full(4, 1e-8 if step < 30 else 1e-9)
        gates = np.array([2.0 + step / 100, 1.0, 1.5, 1.0])
        matrix = np.stack([ratio, eps, gates], axis=1)
        scalars = {"loss": loss, "grad_norm": 1.0 + (50.0 if spike else 0.1 * rng.random()), "lr": 1e-3}
        scalars["update_skips"] = 1.0 if step >= 20 else 0.0
        m = _msg(layouts, step, scalars=scalars, stats=("update_ratio", "adam_eps", "wesar_gate"), tensors=TENSORS,
                 matrix=matrix)  # fmt: skip
        assert rec.record(m, 2.0e9 + i)
        if probes:
            growth = np.array([1.0, 1.0 + step / 20, 1.0, 1.0 + step / 40])
            m = _msg(
                layouts, step, stats=("out_rms", "out_l2"), tensors=LINEARS, matrix=np.stack([growth, growth * 8], 1)
            )
            rec.record(m, 2.0e9 + i + 0.1)
            m = _msg(layouts, step, stats=("attn_logit_max",), tensors=ATTN, matrix=[[5.0 + step], [3.0 * 1.05**step]])
            rec.record(m, 2.0e9 + i + 0.2)
        if risk:
            score = 1.0 if spike else 0.0
            eta = {"attn_logit": max(1.0, 200.0 - step)} if step > 10 else {}
            rec.record_risk("r1", 0, step, 2.0e9 + i, score=score, predictor="loss_spike" if score else None,
                            layer=None, eta=eta, explanation="loss_spike: loss 9 ..." if score else "")  # fmt: skip
    rec.close()
    if events:
        log = EventLog(directory / "events.jsonl", clock=lambda: 2.0e9)
        log.open()
        log.append({"type": "agent_start", "pid": 1, "version": "test"})
        cmd = {"id": "c-1", "action": "rollback", "args": {"steps_back": 10, "skip": 30}}
        log.append({"type": "decision", "id": "d-1", "run": "r1", "rank": 0, "step": rollback_at, "epoch": 0,
                    "detector": "loss_spike", "severity": "critical", "statistic": "loss", "layer": None,
                    "value": 9.0, "evidence": {"z": 21.0, "ratio": 2.9}, "action": "rollback",
                    "reason": "loss_spike (critical): loss 9 at step 50 is 2.9× the median", "commands": [cmd]})  # fmt: skip
        log.append({"type": "sent", "id": "c-1", "run": "r1", "action": "rollback", "attempt": 1})
        log.append({"type": "ack", "id": "c-1", "run": "r1", "status": "applied", "step": rollback_at + 2,
                    "detail": "rolled back from step 52 to step-40; skipped 30 batch(es)"})  # fmt: skip
        log.append({"type": "rewind", "run": "r1", "from_step": rollback_at + 2, "to_step": back_to, "epoch": 1,
                    "offset": 13})  # fmt: skip
        log.append({"type": "decision", "id": "d-2", "run": "r1", "rank": 0, "step": 70, "epoch": 1,
                    "detector": "attn_logit", "severity": "warning", "statistic": "attn_logit_max",
                    "layer": "h.1.attn", "value": 300.0, "evidence": {"slope": 0.05}, "action": "lr_scale",
                    "reason": "attn_logit (warning): <script>alert(1)</script> ETA 20 steps",
                    "commands": [{"id": "c-2", "action": "lr_scale", "args": {"factor": 0.5}}]})  # fmt: skip
        log.append({"type": "suppressed", "id": "d-3", "run": "r1", "rank": 0, "step": 72, "epoch": 1,
                    "detector": "grad_norm_spike", "severity": "critical", "action": "skip_update",
                    "why": "cooldown", "reason": "grad_norm_spike (critical) held back"})  # fmt: skip
        log.close()


def panels(html: str) -> dict[str, str]:
    """panel key -> 'figure' or 'missing'."""
    out = {}
    for kind, key in re.findall(r'<(figure|p class="missing") data-panel="([a-z_]+)"', html):
        out[key] = "figure" if kind == "figure" else "missing"
    return out


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_run_has_every_panel_embedded_and_beside(tmp_path):
    write_run(tmp_path / "state")
    result = build_report([tmp_path / "state"], tmp_path / "out" / "report.html")
    html = result.html.read_text()
    assert panels(html) == dict.fromkeys(
        ["overview", "detections", "risk", "update_ratio", "out_rms", "attn_logit_max", "adam_eps", "wesar_gate"],
        "figure",
    )
    embedded = images(html)
    assert len(embedded) == 8 and all(b.startswith(PNG) and len(b) > 5000 for b in embedded)
    assert sorted(p.name for p in result.images) == sorted(
        f"report-r1-{k}.png"
        for k in (
            "overview",
            "detections",
            "risk",
            "update_ratio",
            "out_rms",
            "attn_logit_max",
            "adam_eps",
            "wesar_gate",
        )
    )
    assert all(p.read_bytes() in embedded for p in result.images)
    assert "http://" not in html and "https://" not in html  # opens offline: nothing to fetch
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    rows = re.findall(r'<tr class="event (\w+)" data-type="\w+" data-action="(\w*)">', html)
    assert (
        ("decision", "rollback") in rows and ("decision", "lr_scale") in rows and ("suppressed", "skip_update") in rows
    )
    assert [r for r in rows if r[0] in ("ack", "sent", "rewind")] == [("sent", ""), ("ack", ""), ("rewind", "")]
    assert "rolled back from step 52 to step-40" in html and "z=21" in html  # the evidence lines
    # the attn_logit decision was written without a curve (as by an agent before forecasts carried one)
    missing = "event #5 (attn_logit/warning h.1.attn at step 70): no chart, no curve in its evidence"
    assert result.panels_left_out == [f"r1/forecasts: {missing}"] and result.notes == []
    assert '<h3 id="run-0-forecasts">Forecasts (0)</h3>' in html and missing in html and "forecast-link" not in html


def test_events_only(tmp_path):
    write_run(tmp_path, probes=False)
    for p in tmp_path.glob("stats-*.jsonl"):
        p.unlink()
    result = build_report([tmp_path / "events.jsonl"], tmp_path / "r.html")
    html = result.html.read_text()
    got = panels(html)
    assert got["detections"] == "figure"
    assert {k for k, v in got.items() if v == "missing"} == {
        "overview", "risk", "update_ratio", "out_rms", "attn_logit_max", "adam_eps", "wesar_gate"
    }  # fmt: skip
    assert "no loss, gradient norm or learning rate in the recordings" in html
    assert html.count('data-type="decision"') == 2 and 'data-type="agent_start"' in html


def test_recordings_only(tmp_path):
    write_run(tmp_path, events=False, probes=False, risk=False)
    html = build_report([tmp_path], tmp_path / "r.html").html.read_text()
    got = panels(html)
    assert got["overview"] == got["update_ratio"] == got["adam_eps"] == got["wesar_gate"] == "figure"
    assert got["risk"] == got["out_rms"] == got["attn_logit_max"] == got["detections"] == "missing"
    assert "No events recorded for this run." in html


def test_empty_directory(tmp_path):
    (tmp_path / "state").mkdir()
    result = build_report([tmp_path / "state"], tmp_path / "r.html")
    assert "No runs found" in result.html.read_text() and result.images == []


def test_corrupt_and_truncated_lines_become_notes(tmp_path):
    write_run(tmp_path, probes=False)
    rec = tmp_path / "stats-r1.jsonl"
    lines = rec.read_text().splitlines()
    lines.insert(5, "{not json")
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # cut short by a crash
    rec.write_text("\n".join(lines) + "\n")
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"v":1,"type":"ack","id":"c-9","run":"r1","sta')
    (tmp_path / "other.jsonl").write_text("garbage\n")
    result = build_report([tmp_path], tmp_path / "r.html")
    html = result.html.read_text()
    assert panels(html)["overview"] == "figure" and html.count('data-type="decision"') == 2
    notes = "\n".join(result.notes)
    assert (
        "stats-r1.jsonl:6: JSONDecodeError" in notes and "events.jsonl:8: not JSON" in notes and "other.jsonl" in notes
    )
    assert "3 line(s) left out" in html


def test_records_with_odd_fields_do_not_break_the_page(tmp_path):
    write_run(tmp_path, probes=False)
    odd = [
        '{"v":1,"type":"decision","run":"r1","step":"x","commands":"bad","evidence":[1,2],"time":"soon"}',
        '{"v":1,"type":"decision","run":"r1","step":60,"commands":[{"action":"explode","args":null},7]}',
        '{"v":1,"type":"rewind","run":"r1","from_step":null,"to_step":3}',
        '{"v":1,"type":"mystery","run":"r1","payload":{"a":[1,2,3]}}',
        '{"v":2,"type":"decision","run":"r1"}',
        "[1, 2, 3]",
    ]
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write("\n".join(odd) + "\n")
    with open(tmp_path / "stats-r1.jsonl", "a") as f:
        f.write('{"type":"risk","run":"r1","step":5,"score":"high","eta":{}}\n')
        f.write('{"type":"risk","run":"r1","step":6,"score":0.5,"eta":[1]}\n')
    result = build_report([tmp_path], tmp_path / "r.html")
    html = result.html.read_text()
    assert panels(html)["overview"] == panels(html)["risk"] == "figure"
    assert html.count('data-type="decision"') == 4 and 'data-type="mystery"' in html
    assert sum("left out" in n for n in result.notes) == 4  # two unknown-version events, two bad risk lines


def test_damaged_recording_header_is_a_note_not_an_error(tmp_path):
    write_run(tmp_path, probes=False)
    rec = tmp_path / "stats-r1.jsonl"
    rec.write_bytes(b"\x00\x01garbage\n" + rec.read_bytes().split(b"\n", 1)[1])
    result = build_report([tmp_path], tmp_path / "r.html")
    assert any("stats-r1.jsonl" in n for n in result.notes)
    assert panels(result.html.read_text())["detections"] == "figure"


def test_rotated_recordings_are_read_oldest_first(tmp_path):
    layouts: dict = {}
    rec = StatsRecorder(tmp_path, max_file_bytes=3000, max_files=3)
    for step in range(60):
        rec.record(_msg(layouts, step, scalars={"loss": 3.0, "grad_norm": 1.0}), float(step))
    rec.close()
    assert (tmp_path / "stats-r1.2.jsonl").exists()
    from agent.report import load

    data = load([tmp_path])
    steps = data.runs["r1"].steps
    assert steps == sorted(steps) and steps[-1] == 59 and data.runs["r1"].epochs[-1] == 0


def test_missing_path_and_unwritable_output(tmp_path, capsys):
    with pytest.raises(ReportError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "r.html")
    assert agent_main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="cannot write"):
        build_report([tmp_path], tmp_path / "file" / "r.html")


def test_matplotlib_missing_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(MatplotlibMissing, match=r"llm-sentinel\[report\]"):
        build_report([tmp_path], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_marks_pair_rollbacks_with_their_rewind_and_skip():
    events = [
        {"type": "decision", "step": 50, "detector": "loss_spike", "severity": "critical", "action": "rollback",
         "commands": [{"id": "c", "action": "rollback", "args": {"steps_back": 10, "skip": 30}}]},
        {"type": "ack", "id": "c", "status": "applied", "step": 52},
        {"type": "rewind", "from_step": 52, "to_step": 40},
        {"type": "rewind", "from_step": 90, "to_step": 80},
    ]  # fmt: skip
    m = marks_from_events(events)
    assert [(a.action, a.outcome) for a in m.actions] == [("rollback", "applied")]
    assert [(s.start, s.end, s.label) for s in m.spans] == [
        (40, 52, "rolled back 52→40, skipped 30 batches"),
        (80, 90, "went back 90→80 (a restart)"),
    ]


def test_segments_keep_one_increasing_trajectory():
    steps = np.array([0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6])
    epochs = np.array([0] * 6 + [1] * 5)
    values = np.array([5, 4, 3, 9, 9, 9, 3, 2.9, 2.8, 2.7, 2.6])
    (ks, kv), abandoned = plots.segments(steps, epochs, values)
    assert ks.tolist() == [0, 1, 2, 3, 4, 5, 6] and 9 not in kv.tolist()
    assert [s.tolist() for s, _ in abandoned] == [[1, 2, 3, 4, 5]]  # from the last kept point, to stay connected


def test_long_runs_are_binned_keeping_spikes():
    steps = np.arange(10_000)
    matrix = np.ones((3, 10_000))
    matrix[1, 7_777] = 1e4
    s, m = plots._bin(steps, matrix)
    assert len(s) == plots.MAX_COLUMNS and m.shape == (3, plots.MAX_COLUMNS) and m.max() == 1e4


def test_many_layers_get_readable_labels():
    from agent.report.load import RunData
    from agent.report.marks import Marks

    rd = RunData("r")
    series = rd.stats["attn_logit_max"] = StatSeries()
    names = tuple(f"model.layers.{i}.self_attn" for i in range(200))
    for step in range(30):
        series.add(step, 0, names, np.linspace(1, 100, 200) * (1 + step / 30))
    fig, note = plots.heatmap(rd, "attn_logit_max", title="t", colorbar="c", marks=Marks())
    assert note is None
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 30 <= len(labels) <= 60 and labels[0] == "model.layers.0.self_attn"
    assert fig.get_size_inches()[1] <= 16
    assert ax.get_xlabel() == "training step"


def test_the_agent_persists_risk_lines_on_change_only(tmp_path):
    """Supervisor + StatsRecorder as the agent wires them: a spike's risk is on disk, quiet steps are not repeated."""
    config = load_config({"predict": {"loss": {"warmup": 8}}})
    recorder = StatsRecorder(tmp_path, max_file_bytes=1 << 20, max_files=2)
    events = EventLog(tmp_path / "events.jsonl")
    events.open()
    sup = Supervisor(config, events)
    sup.recorder = recorder
    history = History(steps=256, max_series=8, max_matrix_bytes=1 << 20, max_scalar_names=32, max_layouts=8)
    layouts: dict = {}
    rng = np.random.default_rng(1)
    for step in range(40):
        loss = 9.0 if step == 30 else 3.0 + 0.01 * rng.standard_normal()
        msg = _msg(layouts, step, scalars={"loss": loss, "grad_norm": 1.0})
        recorder.record(msg, float(step))
        sup.observe(msg, history.push(msg, float(step)).series)
    recorder.close()
    events.close()
    risk: list[dict] = []
    assert len(list(read_recording([tmp_path / "stats-r1.jsonl"], risk=risk))) == 40
    assert risk[0]["step"] == 0 and risk[0]["score"] == 0.0  # a quiet start: one line
    assert [r["step"] for r in risk if r["score"] == 0.0] == [0]
    top = max(risk, key=lambda r: r["score"])
    assert top["step"] == 30 and top["score"] == 1.0 and top["predictor"] == "loss_spike"
    assert "loss" in top["explanation"]
    assert [r["step"] for r in risk][1:] == list(range(30, 40))  # decaying: one line per step


def test_every_rotated_recording_file_carries_the_risk_in_force(tmp_path):
    """A quiet run's risk never changes, yet each file stands alone: the agent writes it again in a new file."""
    config = load_config({})
    recorder = StatsRecorder(tmp_path, max_file_bytes=2048, max_files=3)
    sup = Supervisor(config, EventLog(None))
    sup.recorder = recorder
    history = History(steps=256, max_series=8, max_matrix_bytes=1 << 20, max_scalar_names=32, max_layouts=8)
    layouts: dict = {}
    for step in range(60):
        msg = _msg(layouts, step, scalars={"loss": 3.0, "grad_norm": 1.0})
        recorder.record(msg, float(step))
        sup.observe(msg, history.push(msg, float(step)).series)
    recorder.close()
    files = sorted(tmp_path.glob("stats-r1*.jsonl"))
    assert len(files) == 3
    for path in files:
        risk: list[dict] = []
        steps = [r.message.step for r in read_recording([path], risk=risk)]
        assert steps and [r["step"] for r in risk] == steps[:1], path.name  # one line, with the file's first message


def logit_run(directory, steps: int = 131) -> list[dict]:
    """The real Supervisor, event log and recorder on a max attention logit of h.0.attn growing as
    100·exp(k·t), 1e4 at step 150: a warning from about step 40, critical about 25 steps before."""
    config = load_config({})
    recorder = StatsRecorder(directory, max_file_bytes=1 << 22, max_files=2)
    events = EventLog(directory / "events.jsonl", clock=lambda: 2.0e9)
    events.open()
    sup = Supervisor(config, events)
    sup.recorder = recorder
    history = History(steps=256, max_series=8, max_matrix_bytes=1 << 20, max_scalar_names=32, max_layouts=8)
    layouts: dict = {}
    k = math.log(100.0) / 150
    for step in range(steps):
        for kw in ({"scalars": {"loss": 3.0, "grad_norm": 1.0}},
                   {"stats": ("attn_logit_max",), "tensors": ATTN, "matrix": [[100.0 * math.exp(k * step)], [20.0]]}):  # fmt: skip
            msg = _msg(layouts, step, **kw)
            recorder.record(msg, float(step))
            sup.observe(msg, history.push(msg, float(step)).series)
    recorder.close()
    events.close()
    return [r for r in events.records if r["type"] == "decision"]


def test_an_attention_logit_warning_gets_a_forecast_panel_linked_from_its_event(tmp_path):
    decisions = logit_run(tmp_path / "state")
    assert [(d["detector"], d["severity"]) for d in decisions] == [
        ("attn_logit", "warning"),
        ("attn_logit", "critical"),
    ]
    assert all(d["evidence"]["curve"]["limit"] == 1e4 for d in decisions)  # the detection's curve, in the record
    result = build_report([tmp_path / "state"], tmp_path / "out" / "report.html")
    html = result.html.read_text()
    rows = re.findall(r'<td class="num" id="run-0-ev-(\d+)">\d+</td>.*?</tr>', html, re.S)
    linked = re.findall(r'<td class="num" id="run-0-ev-(\d+)">(?:(?!</tr>).)*href="#run-0-fc-(\d+)"', html, re.S)
    assert len(rows) == 2 and [a for a, b in linked] == [b for a, b in linked] == rows  # each decision row links
    figures = re.findall(
        r'<figure class="forecast" id="run-0-fc-(\d+)" data-forecast="attn_logit"><img alt="([^"]*)" '
        r'src="data:image/png;base64,([^"]+)"><figcaption>(.*?)</figcaption>',
        html,
    )
    assert [f[0] for f in figures] == rows and [f[1] for f in figures] == [
        "attn_logit / h.0.attn / warning", "attn_logit / h.0.attn / critical"
    ]  # fmt: skip
    for index, _, data, caption in figures:
        beside = tmp_path / "out" / f"report-r1-forecast-{index}.png"
        assert base64.b64decode(data) == beside.read_bytes() and beside.read_bytes().startswith(PNG)
        assert beside in result.images and f'href="#run-0-ev-{index}"' in caption and "ETA " in caption
    assert html.index("Forecasts (2)") < html.index("<h3>Events")  # next to the events table
    assert not any("forecasts" in p for p in result.panels_left_out)

    # what the warning's panel draws: its points, the line, the limit, the detection's step and the ETA
    panel = forecasts.select(load_report_events(tmp_path / "state")).panels[0]
    fig = forecasts.figure(panel)
    (ax,) = fig.axes
    curve, warn = panel.curve, decisions[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "attn_logit / h.0.attn / warning"
    assert len(ax.collections[0].get_offsets()) == len(curve.steps) == len(warn["evidence"]["curve"]["steps"])
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["limit 10000"].get_ydata()) == [1e4, 1e4]
    assert list(lines[f"detection at step {warn['step']}"].get_xdata()) == [warn["step"]] * 2
    eta_step = warn["step"] + warn["eta_steps"]
    assert lines["fitted line"].get_xdata()[-1] == pytest.approx(eta_step)  # to the ETA ...
    assert lines["fitted line"].get_ydata()[-1] == pytest.approx(1e4, rel=1e-6)  # ... where it meets the limit
    assert any(label.startswith(f"ETA {warn['eta_steps']:.0f} steps") for label in lines)
    assert ax.get_xlim()[1] >= eta_step and ax.get_ylim()[1] > 1e4


def load_report_events(directory) -> list[dict]:
    from agent.report import load

    return load([directory]).runs["r1"].events


def _trend_record(step: int, severity: str = "warning", detector: str = "attn_logit", **evidence) -> dict:
    return {"type": "decision", "id": f"d-{step}", "run": "r1", "rank": 0, "step": step, "epoch": 0,
            "detector": detector, "severity": severity, "statistic": "attn_logit_max", "layer": "h.0.attn",
            "value": 300.0, "eta_steps": 50.0, "evidence": evidence, "action": "warn", "reason": "r",
            "commands": []}  # fmt: skip


CURVE = {"steps": [1, 2, 3, 4], "values": [100.0, 120.0, 150.0, 180.0], "scale": "log", "slope": 0.2,
         "at_step": 4, "at_value": 180.0, "limit": 1e4}  # fmt: skip


def test_malformed_curves_become_notes_and_the_rest_is_drawn(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", clock=lambda: 2.0e9)
    log.open()
    bad = [
        {"curve": {**CURVE, "values": [1.0]}},
        {"curve": {**CURVE, "scale": "weird"}},
        {"curve": {**CURVE, "limit": "NaN"}},
        {"curve": {**CURVE, "steps": ["a", 2, 3, 4]}},
        {"curve": "not a curve"},
        {"curve": {**CURVE, "values": ["NaN", -1.0, 0.0, "Infinity"]}},  # nothing drawable on a log scale
        {},  # a trend detector's record without a curve (an older agent)
    ]
    for i, evidence in enumerate(bad):
        log.append(_trend_record(10 + i, **evidence))
    log.append(_trend_record(30, **{"curve": CURVE}))
    log.append({**_trend_record(31, detector="loss_spike"), "evidence": {"z": 9.0}})  # not a trend: no panel, no note
    log.append({**_trend_record(32), "evidence": [1, 2]})
    log.close()
    result = build_report([tmp_path], tmp_path / "r.html")
    html = result.html.read_text()
    notes = [n.removeprefix("r1/forecasts: ") for n in result.panels_left_out if n.startswith("r1/forecasts: ")]
    assert notes == [
        "event #1 (attn_logit/warning h.0.attn at step 10): no chart, its curve has 4 steps but 1 values",
        "event #2 (attn_logit/warning h.0.attn at step 11): no chart, its curve's scale is 'weird', not log or linear",
        "event #3 (attn_logit/warning h.0.attn at step 12): no chart, its curve's limit is not a finite number",
        "event #4 (attn_logit/warning h.0.attn at step 13): no chart, its curve's steps are not all integers",
        "event #5 (attn_logit/warning h.0.attn at step 14): no chart, its curve is not an object",
        "event #6 (attn_logit/warning h.0.attn at step 15): no chart, its curve has no point that can be drawn",
        "event #7 (attn_logit/warning h.0.attn at step 16): no chart, no curve in its evidence",
        "event #10 (attn_logit/warning h.0.attn at step 32): no chart, no curve in its evidence",
    ]
    assert all(n.replace("'", "&#x27;") in html for n in notes)
    assert re.findall(r'<figure class="forecast" id="run-0-fc-(\d+)"', html) == ["8"]
    assert (tmp_path / "r-r1-forecast-8.png").read_bytes().startswith(PNG)


def test_a_forecast_panel_that_fails_to_draw_is_a_note(tmp_path, monkeypatch):
    log = EventLog(tmp_path / "events.jsonl", clock=lambda: 2.0e9)
    log.open()
    log.append(_trend_record(5, curve=CURVE))
    log.close()

    def boom(panel):
        raise ValueError("no room")

    monkeypatch.setattr(forecasts, "figure", boom)
    result = build_report([tmp_path], tmp_path / "r.html")
    assert [p for p in result.panels_left_out if "forecasts" in p] == [
        "r1/forecasts: event #1 (attn_logit/warning h.0.attn at step 5): could not be drawn (ValueError: no room)"
    ]
    assert "forecast-link" not in result.html.read_text() and not list(tmp_path.glob("r-r1-forecast-*.png"))


def test_at_most_12_panels_the_first_warning_and_critical_of_each_predictor_first():
    records = [_trend_record(s, curve=CURVE) for s in range(20)]  # 20 attn_logit warnings
    records += [{"type": "ack", "id": "c", "status": "applied"}]
    records += [_trend_record(100, "critical", curve=CURVE), _trend_record(101, "critical", curve=CURVE)]
    records += [_trend_record(200 + s, detector="adam_eps", curve=CURVE) for s in range(3)]
    got = forecasts.select(records)
    steps = [p.record["step"] for p in got.panels]
    assert len(steps) == forecasts.MAX_PANELS and steps == sorted(steps)
    assert {100, 200} <= set(steps) and 101 not in steps  # each (predictor, severity) first, then in order
    assert steps[:9] == list(range(9)) and 0 in steps
    assert got.notes == [
        "13 more trend detection(s) not drawn: at most 12 panels per run, the first warning and the first critical "
        "of each predictor first"
    ]


def test_a_far_eta_is_clipped_and_written_and_a_jump_has_no_line():
    far = {**_trend_record(4, curve=CURVE), "eta_steps": 500.0}
    jump = {**_trend_record(5, detector="update_ratio", curve={**CURVE, "slope": 0.0}), "eta_steps": None}
    p_far, p_jump = forecasts.select([far, jump]).panels
    (ax,) = forecasts.figure(p_far).axes
    assert ax.get_xlim()[1] < 4 + 3 * 3 + 1  # three spans of the points past the last, not step 504
    assert [t.get_text() for t in ax.texts] == ["ETA 500 steps (step 504) →"]
    assert "fitted line" in [line.get_label() for line in ax.get_lines()]
    (ax,) = forecasts.figure(p_jump).axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert "fitted line" not in labels and "limit 10000" in labels and not ax.texts
    assert ax.get_title() == "update_ratio / h.0.attn / warning"


def _clean_run(n: int = 60):
    from agent.report.load import RunData

    rd = RunData("clean")
    rd.steps, rd.epochs = list(range(n)), [0] * n
    rd.scalars = {
        "loss": [3.0 - 0.01 * s for s in range(n)],
        "grad_norm": [1.0 + 0.1 * (s % 3) for s in range(n)],
        "lr": [1e-3] * n,
    }
    return rd


def _legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_a_clean_runs_overview_has_no_legend_of_identical_lines():
    from agent.report.marks import Marks

    fig, note = plots.overview(_clean_run(), Marks())
    assert note is None
    labels = _legend_labels(fig)
    assert not {"loss", "grad_norm", "lr"} & set(labels), labels  # was three blue lines named by their panel
    assert len(labels) == len(set(labels))


def test_the_eta_axis_is_log_without_a_zero_tick_and_lists_only_drawn_lines():
    from agent.report.marks import Marks

    rd = _clean_run()
    rd.risk = [
        {"step": s, "score": 0.2, "explanation": "", "eta": {"attn_logit": 400.0 / (s + 1), "update_ratio": math.nan}}
        for s in range(0, 60, 5)
    ]
    fig, note = plots.risk(rd, Marks())
    assert note is None
    eta_ax = fig.axes[1]
    assert eta_ax.get_yscale() == "log"
    fig.canvas.draw()
    ticks = [t.get_text() for t in eta_ax.get_yticklabels() if t.get_text()]
    assert ticks and "0" not in ticks, ticks
    labels = _legend_labels(fig)
    assert "ETA attn_logit" in labels and "ETA update_ratio" not in labels, labels  # nothing drawn, not listed


def test_notes_set_backticked_names_as_code():
    from agent.report.page import Panel, note_html

    assert note_html("no `attn_logit_max` statistics <here>") == (
        "no <code>attn_logit_max</code> statistics &lt;here&gt;"
    )
    html = Panel("heat", "Attention logits", "", note="no `attn_logit_max` statistics in the recordings").html()
    assert "<code>attn_logit_max</code>" in html and "`" not in html
