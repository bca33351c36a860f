"""The status page in a real headless browser, fed by a real trainer process through a real agent.

Chromium loads ``/``, runs the page's script (``--virtual-time-budget``) and dumps the DOM it
ends with, so the assertions see what a person sees after the script has fetched
``/api/status`` and redrawn.  A second run, pushed as probe messages whose max attention logit
grows exponentially, has a forecast: its chart (points, fitted line, dashed limit) must be in the
DOM the script drew, with the same geometry as the server's.  The screenshot is kept as a test
artifact, under ``$SENTINEL_TEST_ARTIFACTS`` when set.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from agent_proc import AgentProc, Pusher, fetch, make_frames, require_binary

from agent.status_page import fmt

TRAINER = Path(__file__).resolve().parents[1] / "trainer_proc.py"
RUN = "tiny <img src=x onerror=alert(1)> run"
FORECAST_RUN = "logits <svg onload=alert(2)> run"
LAYER = "h.0.<b>attn</b>"
STEPS = 120


class _Dom(HTMLParser):
    """Tags seen, and the text of each ``<dd class=...>`` inside the card of ``RUN``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.body: dict[str, str] = {}
        self.facts: dict[str, str] = {}
        self.charts: dict[str, int] = {}
        self._in_run = False
        self._dd: str | None = None
        self._chart: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        elif tag == "article":
            self._in_run = a.get("data-run") == RUN
        elif tag == "dd" and self._in_run:
            self._dd = a.get("class")
        elif tag == "svg" and self._in_run:
            self._chart = (a.get("class") or "").removeprefix("chart-")
        elif tag == "polyline" and self._in_run and self._chart:
            self.charts[self._chart] = self.charts.get(self._chart, 0) + len((a.get("points") or "").split())

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._in_run = False
        elif tag == "dd":
            self._dd = None

    def handle_data(self, data: str) -> None:
        if self._dd:
            self.facts[self._dd] = self.facts.get(self._dd, "") + data


class _Forecasts(HTMLParser):
    """The forecast figures inside the card of ``FORECAST_RUN``: per predictor, the chart's parts and text."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self._in_run = False
        self._fig: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "article":
            self._in_run = a.get("data-run") == FORECAST_RUN
        elif not self._in_run:
            return
        elif tag == "figure" and a.get("class") == "forecast":
            self._fig = self.figures[a["data-predictor"]] = {"svg": None, "points": [], "text": ""}
        elif self._fig is None:
            return
        elif tag == "svg":
            self._fig["svg"] = a.get("class")
        elif tag == "line" and a.get("class") == "limit":
            self._fig["limit"] = (float(a["y1"]), float(a["y2"]), a.get("stroke-dasharray"))
        elif tag == "polyline" and a.get("class") == "fit":
            self._fig["fit"] = [tuple(map(float, p.split(","))) for p in a["points"].split()]
        elif tag == "circle" and a.get("class") == "point":
            self._fig["points"].append((float(a["cx"]), float(a["cy"])))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._fig = None
        elif tag == "article":
            self._in_run = False

    def handle_data(self, data: str) -> None:
        if self._fig is not None:
            self._fig["text"] += data


def _forecasts(page: str) -> dict[str, dict]:
    parser = _Forecasts()
    parser.feed(page)
    return parser.figures


def _push_logits(endpoint: str) -> None:
    """Max attention logit of LAYER growing as 100·exp(k·t), 1e4 at step 150: a warning from about step 40."""
    k = math.log(100.0) / 150
    with Pusher(endpoint) as p:
        for t in range(71):
            p.send(make_frames(run=FORECAST_RUN, step=t, scalars={"loss": 3.0}, stats=("attn_logit_max",),
                               tensors=(LAYER, "h.1.attn"), matrix=[[100.0 * math.exp(k * t)], [20.0]]))  # fmt: skip


def _chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    exe = require_binary("chromium")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    cmd += ["--virtual-time-budget=6000", *mode, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_browser_shows_the_live_run_after_the_script_redraws(
    start_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    require_binary("chromium")
    agent = start_agent()
    base = agent.metrics_url.removesuffix("metrics")
    empty = _chromium(base, tmp_path, "--dump-dom")  # before any run: the script must cope too
    assert 'data-rendered="api"' in empty.stdout and "No statistics received yet" in empty.stdout, empty.stderr
    report = tmp_path / "trainer.json"
    cmd = [sys.executable, str(TRAINER), "--endpoint", agent.stats_endpoint, "--run", RUN]
    subprocess.run([*cmd, "--steps", str(STEPS), "--width", "64", "--out", str(report)], check=True, timeout=120)
    last_loss = json.loads(report.read_text())["losses"][-1]
    agent.wait_for(lambda s: s.value("sentinel_training_step", run=RUN) == STEPS - 1)
    (run,) = json.loads(fetch(base + "api/status"))["runs"]
    assert run["step"] == STEPS - 1 and run["scalars"]["loss"] == pytest.approx(last_loss, rel=1e-6)
    _push_logits(agent.stats_endpoint)
    agent.wait_for(lambda s: s.value("sentinel_training_step", run=FORECAST_RUN) == 70)
    doc = json.loads(fetch(base + "api/status"))
    (fc,) = next(r for r in doc["runs"] if r["run"] == FORECAST_RUN)["forecasts"]
    assert fc["predictor"] == "attn_logit" and fc["severity"] == "warning" and fc["curve"]["limit"] == 1e4
    server = _forecasts(fetch(base))["attn_logit"]  # as the agent rendered it, before any script ran

    result = _chromium(base, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _Dom()
    dom.feed(result.stdout)
    assert dom.body.get("data-rendered") == "api", "the page's script did not redraw from /api/status"
    assert dom.facts.get("step") == str(STEPS - 1)
    assert dom.facts.get("loss") == fmt(last_loss)
    assert "grad_norm" in dom.facts
    assert dom.charts.get("loss", 0) >= 20 and dom.charts.get("grad_norm", 0) >= 20
    assert "img" not in dom.tags  # the run name stayed text

    drawn = _forecasts(result.stdout)["attn_logit"]  # as the script redrew it from /api/status
    assert drawn["svg"] == "forecast-chart scale-log" and drawn["limit"][2] == "5 3"
    assert len(drawn["points"]) == len(fc["curve"]["steps"]) and len(drawn["fit"]) == 2
    assert all(y > drawn["limit"][0] for _, y in drawn["points"])  # the points lie below the limit they head to
    for part in ("attn_logit", LAYER, "warning", "ETA ≈", "limit 10000", fc["message"]):
        assert part in drawn["text"], part
    assert "b" not in dom.tags  # the layer name stayed text too
    assert drawn["text"] == server["text"]  # the script draws what the server drew: the same labels...
    for key in ("limit", "fit", "points"):  # ... and the same geometry
        got, want = drawn[key], server[key]
        flat = [x for p in got for x in p] if key != "limit" else list(got[:2])
        ref = [x for p in want for x in p] if key != "limit" else list(want[:2])
        assert flat == pytest.approx(ref, abs=0.11), key

    artifacts = Path(os.environ.get("SENTINEL_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "status-page.png"
    shot.unlink(missing_ok=True)
    result = _chromium(base, tmp_path, f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars")
    assert result.returncode == 0, result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    print(f"status page screenshot: {shot}")
