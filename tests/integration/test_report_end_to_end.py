"""The run report of a real run: tiny GPT, a bad-batch region, a live agent that rolls back, then the CLI.

The agent is ``sentinel-agent run`` as users start it; the trainer runs the ε-tuner, WeSaR and
the forward probes, so every panel has real statistics; the report is made afterwards by
``sentinel-agent report`` from the agent's state directory alone.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sentinel
from agent.predict import TREND_PREDICTORS
from agent.recording import read_recording
from agent.spawn import AgentProcess
from examples.tiny_gpt import GPT, BadRegion, GPTConfig, Windows, stdlib_corpus

PNG = b"\x89PNG\r\n\x1a\n"
PANELS = ("overview", "detections", "risk", "update_ratio", "out_rms", "attn_logit_max", "adam_eps", "wesar_gate")
BAD, LENGTH, AFTER, BATCH = 40, 8, 12, 16


def train(agent: AgentProcess, ckpt: Path) -> int:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    total = BAD + LENGTH + AFTER
    data = Windows(stdlib_corpus(), 64, (total + 40) * BATCH, seed=0)
    loader = torch.utils.data.DataLoader(BadRegion(data, BAD * BATCH, (BAD + LENGTH) * BATCH), batch_size=BATCH)
    config = {
        "run": "report-run",
        "log_level": "warning",
        "publish": {"endpoint": agent.stats_endpoint},
        "control": {"endpoint": agent.commands_endpoint},
        "checkpoint": {"dir": str(ckpt), "every": 10, "good_after": 5, "keep": 3},
        "optim": {"eps": {"enabled": True, "every": 5}, "wesar": {"enabled": True}},
        "probes": {"enabled": True, "every": 5},
    }
    trained = 0
    with sentinel.attach(model, opt, config=config, lr_scheduler=schedule) as sn:
        for x, y in sn.batches(loader):
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            sn.observe(loss=loss)
            trained += 1
            if sn.step >= total:
                break
    return trained


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    agent_config = {
        "predict": {"loss": {"warmup": 24}},
        "policy": {
            "rules": [
                {"detector": "loss_spike", "severity": "critical", "action": "rollback",
                 "args": {"steps_back": 5, "skip": 20}},
                {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
            ]
        },
    }  # fmt: skip
    with AgentProcess(tmp / "agent", config=agent_config) as agent:
        trained = train(agent, tmp / "ckpt")
        events_path = Path(agent.events_path)
    out = tmp / "out" / "report.html"
    cli = subprocess.run(
        [sys.executable, "-m", "agent", "report", str(tmp / "agent"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    risk: list[dict] = []
    recordings = sorted(events_path.parent.glob("stats-*.jsonl"))
    list(read_recording(recordings, risk=risk))
    return {"cli": cli, "out": out, "events": events, "risk": risk, "trained": trained}


def test_the_run_rolled_back(report: dict) -> None:
    decisions = [e for e in report["events"] if e["type"] == "decision" and e["action"] == "rollback"]
    assert len(decisions) == 1 and BAD <= decisions[0]["step"] <= BAD + 2, report["events"]
    acks = [e for e in report["events"] if e["type"] == "ack" and e["id"] == decisions[0]["commands"][0]["id"]]
    assert acks and {a["status"] for a in acks} <= {"applied", "duplicate"}, acks  # duplicate: a resend, acked again
    assert [e["to_step"] for e in report["events"] if e["type"] == "rewind"] == [30]
    assert report["trained"] > BAD + LENGTH + AFTER  # the rolled-back steps were trained again


def test_the_cli_writes_one_self_contained_page_with_every_panel(report: dict) -> None:
    cli = report["cli"]
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.strip() == str(report["out"])
    html = report["out"].read_text()
    shown = re.findall(r'<figure data-panel="([a-z_]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert [k for k, _ in shown] == list(PANELS), cli.stderr
    for key, data in shown:
        png = base64.b64decode(data)
        beside = report["out"].with_name(f"report-report-run-{key}.png")
        assert png.startswith(PNG) and len(png) > 10_000 and beside.read_bytes() == png
    assert "http://" not in html and "https://" not in html
    assert re.search(r"<th>timelines</th><td>2 ", html)


def test_every_event_has_its_row_with_its_evidence(report: dict) -> None:
    html = report["out"].read_text().split("<h2>Agent events")[0]  # the run's own table
    rows = re.findall(r'<tr class="event (\w+)" data-type="\w+" data-action="(\w*)">', html)
    run_events = [e for e in report["events"] if e.get("run") == "report-run"]
    assert len(rows) == len(run_events)
    for kind in ("decision", "ack", "sent", "rewind"):
        assert sum(1 for r in rows if r[0] == kind) == sum(1 for e in run_events if e["type"] == kind) > 0
    for e in run_events:
        if e["type"] == "decision":
            assert (e["type"], e["action"]) in rows
            assert e["reason"].split(" -> ")[0].replace("<", "&lt;").replace(">", "&gt;") in html
        if e["type"] == "ack":
            assert e["detail"] in html


def test_every_trend_detection_has_its_forecast_panel_or_a_note(report: dict) -> None:
    html = report["out"].read_text().split("<h2>Agent events")[0]
    run_events = [e for e in report["events"] if e.get("run") == "report-run"]
    trend = [
        i
        for i, e in enumerate(run_events, 1)
        if e["type"] in ("decision", "suppressed") and e["detector"] in TREND_PREDICTORS
    ]
    drawn = [int(i) for i in re.findall(r'<figure class="forecast" id="run-0-fc-(\d+)"', html)]
    assert set(drawn) <= set(trend) and len(drawn) <= 12
    for i in trend:
        if i in drawn:  # the panel beside the page, and the event's row links to it
            assert report["out"].with_name(f"report-report-run-forecast-{i}.png").read_bytes().startswith(PNG)
            assert re.search(rf'id="run-0-ev-{i}">(?:(?!</tr>).)*href="#run-0-fc-{i}"', html, re.S)
        else:
            assert f"event #{i} " in html or "more trend detection(s) not drawn" in html
    print(f"trend detections: {len(trend)}, forecast panels: {len(drawn)}")


def test_the_agent_persisted_the_risk_it_computed(report: dict) -> None:
    rollback = next(e for e in report["events"] if e["type"] == "decision" and e["action"] == "rollback")
    at = [r for r in report["risk"] if r["step"] == rollback["step"]]
    assert at and at[0]["score"] == 1.0 and at[0]["predictor"] == "loss_spike"
    assert report["risk"][0]["score"] == 0.0 and len(report["risk"]) < report["trained"] + 5


def test_demo_ends_with_the_report(tmp_path: Path) -> None:
    from sentinel.demo import run_demo

    out = io.StringIO()
    result = run_demo(steps=2, lr=1e-3, metrics_port=0, out=out, report_dir=tmp_path)
    assert result.report == tmp_path / "report.html"
    assert f"run report: {result.report}" in out.getvalue()
    html = result.report.read_text()
    assert '<figure data-panel="overview">' in html and '<figure data-panel="update_ratio">' in html
    assert sorted(p.name for p in (tmp_path / "agent-state").iterdir()) == ["events.jsonl", "stats-demo.jsonl"]
