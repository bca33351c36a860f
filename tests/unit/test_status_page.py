"""The status page and /api/status of a real in-process agent fed over real ZeroMQ sockets.

What a person sees must never be markup from the network (run names are user-controlled), must
survive missing data (no runs, no loss, predictions off) and must not hold up the agent.
"""

from __future__ import annotations

import html
import http.server
import json
import math
import re
import select
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_proc import Pusher, fetch, make_frames, parse_metrics
from prometheus_client import CollectorRegistry

from agent.daemon import Agent
from agent.events import plain
from agent.http import AgentHTTPServer, make_app
from agent.predict import Forecast, Risk
from agent.status_html import eta_text
from agent.status_page import RiskTrail, _downsample, event_summary, fmt, forecasts, render_page
from agent.supervisor import RunStatus, SupervisorSnapshot

XSS = "</script><script>alert('x')</script><img src=x onerror=\"alert(1)\">&amp;"


def _config(tmp_path: Path, **extra: object) -> dict:
    return {
        "stats_endpoint": "tcp://127.0.0.1:*",
        "metrics": {"port": 0},
        "commands": {"endpoint": "tcp://127.0.0.1:*"},
        "state_dir": str(tmp_path / "state"),
        **extra,
    }


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(_config(tmp_path)).start()
    yield a
    a.stop()


def _base(agent: Agent) -> str:
    return agent.metrics_url.removesuffix("metrics")


def _push(agent: Agent, frames: list[list[bytes]], timeout: float = 10.0) -> None:
    before = agent.state.received_messages
    with Pusher(agent.stats_endpoint) as p:
        for f in frames:
            p.send(f)
    deadline = time.monotonic() + timeout
    while agent.state.received_messages < before + len(frames):
        assert time.monotonic() < deadline, "the agent did not receive the messages"
        time.sleep(0.01)


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _strict_json(raw: bytes) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(raw, parse_constant=no_constants)


def test_no_runs_yet_page_and_api(agent: Agent) -> None:
    status, headers, body = _get(_base(agent))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert "No statistics received yet" in page and agent.stats_endpoint in page
    events = re.search(r'<table id="events">.*?</table>', page, re.S).group(0)
    assert "agent_start" in events and "no events yet" not in events
    doc = _strict_json(_get(_base(agent) + "api/status")[2])
    assert doc["version"] == 1 and doc["runs"] == []
    assert doc["events"][0]["type"] == "agent_start" and doc["agent"]["stats_endpoint"] == agent.stats_endpoint


def test_xss_looking_run_name_is_escaped_everywhere(agent: Agent) -> None:
    _push(agent, [make_frames(run=XSS, step=s, scalars={"loss": 3.0 - 0.01 * s, "grad_norm": 1.0}) for s in range(20)])
    _push(agent, [make_frames(run=XSS, step=20, scalars={"loss": math.nan, "grad_norm": 1.0})])  # a decision
    deadline = time.monotonic() + 10  # the decision is written (fsynced) just after the message is counted
    while not any(e["type"] == "decision" for e in _strict_json(_get(_base(agent) + "api/status")[2])["events"]):
        assert time.monotonic() < deadline, "no decision was taken on the NaN loss"
        time.sleep(0.02)
    status, headers, body = _get(_base(agent))
    page = body.decode()
    assert status == 200
    assert XSS not in page and "<img src=x" not in page and "alert('x')</script>" not in page
    escaped = (
        "&lt;/script&gt;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
    )
    assert page.count(escaped + "&amp;amp;") >= 3  # card title, data-run attribute, events table
    # only the page's own script runs: the CSP names its nonce, and it is the only <script>
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)
    assert re.findall(r"<script[^>]*>", page) == [f'<script nonce="{nonce}">']
    doc = _strict_json(_get(_base(agent) + "api/status")[2])
    (run,) = doc["runs"]
    assert run["run"] == XSS and run["step"] == 20  # JSON carries the name as data; the script uses textContent
    assert run["scalars"]["loss"] == "NaN"
    assert any(e["type"] == "decision" and e["run"] == XSS for e in doc["events"])


def test_run_without_loss_leaves_its_charts_out_with_a_note(agent: Agent) -> None:
    _push(agent, [make_frames(run="lr-only", step=s, scalars={"lr": 1e-3}) for s in range(5)])
    page = fetch(_base(agent))
    card = re.search(r'<article class="run" data-run="lr-only">.*?</article>', page, re.S).group(0)
    assert 'data-chart="loss"' not in card and 'data-chart="grad_norm"' not in card
    assert "no loss reported recently" in card and "no grad norm reported recently" in card
    assert '<dd class="step">4</dd>' in card and '<dd class="lr">0.001</dd>' in card
    doc = _strict_json(_get(_base(agent) + "api/status")[2])
    assert doc["runs"][0]["charts"]["loss"] == {"steps": [], "values": []}


def test_charts_follow_the_history_and_mark_non_finite_values(agent: Agent) -> None:
    losses = [4.0 - 0.02 * s for s in range(60)]
    losses[50] = math.inf
    frames = [
        make_frames(run="r", step=s, scalars={"loss": v, "grad_norm": 0.5 + s / 100}) for s, v in enumerate(losses)
    ]
    _push(agent, frames)
    deadline = time.monotonic() + 10  # the predictors see a message just after it is counted
    while (run := _strict_json(_get(_base(agent) + "api/status")[2])["runs"][0])["charts"]["risk"]["steps"][-1] < 59:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert run["charts"]["loss"]["steps"] == list(range(60))
    assert run["charts"]["loss"]["values"][50] == "Infinity"
    assert run["charts"]["grad_norm"]["values"][-1] == pytest.approx(0.5 + 59 / 100, rel=1e-6)
    assert run["risk"]["score"] > 0 and "nonfinite" in run["risk"]["explanation"]
    assert run["charts"]["risk"]["steps"][-1] == 59
    page = fetch(_base(agent))
    card = re.search(r'<article class="run" data-run="r">.*?</article>', page, re.S).group(0)
    loss_svg = re.search(r'<svg class="chart-loss".*?</svg>', card, re.S).group(0)
    assert loss_svg.count('class="nonfinite"') == 1 and loss_svg.count("<polyline") == 2  # split at the Inf
    assert '<dd class="loss">' + fmt(losses[-1]) + "</dd>" in card
    assert run["risk"]["explanation"] in page.replace("&#x27;", "'")


def test_predictions_off_and_missing_data_never_raise(tmp_path: Path) -> None:
    a = Agent(_config(tmp_path, predict={"enabled": False})).start()
    try:
        _push(a, [make_frames(run="p", step=0, scalars={})])
        doc = _strict_json(_get(_base(a) + "api/status")[2])
        assert doc["runs"][0]["risk"] is None and any("predictions are off" in n for n in doc["notes"])
        status, _, body = _get(_base(a))
        assert status == 200 and "predictions are off" in body.decode()
    finally:
        a.stop()
    # a hand-written minimal document: no charts, no risk, events missing every optional field
    doc["runs"][0].update(charts=None, scalars={}, ranks=[0, 1, 7])
    doc["events"] = [{"type": "mystery"}, {}]
    page = render_page(doc, "n0nce")
    assert "3 (0…7)" in page and "mystery" in page


def logit_frames(run: str, steps: range, layer: str = "h.0.attn") -> list[list[bytes]]:
    """Probe messages whose max attention logit in ``layer`` grows as 100·exp(k·t), crossing 1e4 at
    step 150 (a flat 20 in the other module): the attn_logit predictor warns from about step 40."""
    k = math.log(100.0) / 150
    return [
        make_frames(
            run=run,
            step=t,
            scalars={"loss": 3.0},
            stats=("attn_logit_max",),
            tensors=(layer, "h.1.attn"),
            matrix=[[100.0 * math.exp(k * t)], [20.0]],
        )
        for t in steps
    ]


def _status_when(agent: Agent, done: Callable[[dict], bool]) -> dict:
    """/api/status once ``done(doc)`` holds (the predictors see a message just after it is counted)."""
    deadline = time.monotonic() + 10
    while not done(doc := _strict_json(_get(_base(agent) + "api/status")[2])):
        assert time.monotonic() < deadline, doc
        time.sleep(0.02)
    return doc


def _forecast_figures(page: str, run: str) -> dict[str, str]:
    card = re.search(rf'<article class="run" data-run="{re.escape(run)}">.*?</article>', page, re.S).group(0)
    figures = re.findall(r'<figure class="forecast" data-predictor="(\w+)">(.*?)</figure>', card, re.S)
    return dict(figures)


def test_a_forecast_is_drawn_with_its_points_line_and_limit(agent: Agent) -> None:
    _push(agent, logit_frames("logits", range(71), layer=XSS))
    doc = _status_when(agent, lambda d: d["runs"] and d["runs"][0]["step"] == 70 and d["runs"][0]["forecasts"])
    (fc,) = doc["runs"][0]["forecasts"]
    assert (fc["predictor"], fc["layer"], fc["statistic"], fc["severity"]) == (
        "attn_logit",
        XSS,
        "attn_logit_max",
        "warning",
    )
    assert fc["step"] == 70 and fc["eta_steps"] == pytest.approx(150 - 70, rel=0.1) and 0.5 < fc["risk"] < 1
    curve = fc["curve"]
    assert curve["scale"] == "log" and curve["limit"] == 1e4 and curve["at_step"] == 70 and curve["slope"] > 0
    assert curve["steps"] == list(range(70 - len(curve["steps"]) + 1, 71)) and len(curve["steps"]) >= 50
    assert curve["values"] == sorted(curve["values"]) and curve["at_value"] == pytest.approx(fc["value"], rel=0.05)

    page = fetch(_base(agent))
    svg_text = _forecast_figures(page, "logits")["attn_logit"]
    assert XSS not in page and html.escape(XSS) in svg_text  # the layer, in the caption and in the message
    assert '<span class="sev sev-warning">warning</span>' in svg_text and eta_text(fc["eta_steps"]) in svg_text
    assert f'<p class="fc-message">{html.escape(fc["message"])}</p>' in svg_text
    limit = re.search(r'<line class="limit" x1="58" x2="312" y1="([\d.]+)" y2="([\d.]+)" stroke-dasharray', svg_text)
    assert limit and limit.group(1) == limit.group(2) and "limit 10000" in svg_text
    points = [
        (float(x), float(y)) for x, y in re.findall(r'<circle class="point" cx="([\d.]+)" cy="([\d.]+)"', svg_text)
    ]
    assert len(points) == len(curve["steps"])
    assert all(y > float(limit.group(1)) for _, y in points)  # below the limit it heads to
    rises = [b[1] - a[1] for a, b in zip(points, points[1:])]
    assert max(rises) - min(rises) < 0.25 and rises[0] < 0  # exponential growth: a straight line on the log axis
    (fit,) = re.findall(r'<polyline class="fit" points="([^"]+)"/>', svg_text)
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in fit.split())
    assert x0 == points[0][0] and x1 == 312.0  # from the first point to the ETA, at the right edge...
    assert y1 == pytest.approx(float(limit.group(1)), abs=0.2)  # ... where the line meets the limit
    assert '<line class="eta" x1="312.0" x2="312.0"' in svg_text and "ETA at step" not in svg_text


def test_a_jump_forecast_without_eta_and_forecasts_without_curves_still_render(agent: Agent) -> None:
    tensors, roles = ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"), ("qkv", "up", "down")
    frames = [
        make_frames(
            run="jump",
            step=t,
            scalars={"loss": 3.0, "lr": 1e-3 * (10 if t >= 20 else 1)},
            stats=("update_ratio",),
            tensors=tensors,
            roles=roles,
            matrix=[[1e-3 * (10 if t >= 20 else 1) * (1 + 0.01 * i)] for i in range(3)],
        )
        for t in range(22)
    ]
    _push(agent, frames)
    doc = _status_when(agent, lambda d: d["runs"] and d["runs"][0]["step"] == 21 and d["runs"][0]["forecasts"])
    (fc,) = doc["runs"][0]["forecasts"]
    assert fc["predictor"] == "update_ratio" and fc["eta_steps"] is None and fc["severity"] == "critical"
    assert fc["curve"]["slope"] == 0.0 and fc["curve"]["limit"] == pytest.approx(4e-3, rel=0.05)
    svg_text = _forecast_figures(fetch(_base(agent)), "jump")["update_ratio"]
    assert '<line class="limit"' in svg_text and 'class="fit"' not in svg_text  # points and limit only
    assert "no ETA" in svg_text and 'class="eta' not in svg_text and "learning rate went from" in svg_text

    # the same document with the curve gone, malformed, or the ETA unknown: text without a chart, never an error
    run = doc["runs"][0]
    attn = {**fc, "predictor": "attn_logit", "eta_steps": None, "curve": {**fc["curve"], "slope": 0.01}}
    far = {**attn, "predictor": "adam_eps", "eta_steps": 1000.0}
    broken = {**fc, "predictor": "log_z", "curve": {"steps": [1, 2], "values": [3.0], "scale": "linear"}}
    run["forecasts"] = [{**fc, "curve": None, "curve_note": None}, attn, far, broken, {"predictor": "out_rms"}]
    figures = _forecast_figures(render_page(doc, "n0nce"), "jump")
    assert "no chart: no curve in its evidence" in figures["update_ratio"]
    assert 'class="fit"' in figures["attn_logit"] and "no ETA" in figures["attn_logit"]
    first, last = fc["curve"]["steps"][0], fc["curve"]["steps"][-1]
    no_eta_end = math.floor(last + (last - first) / 4 + 0.5)  # without an ETA: a quarter of the span past the last
    assert f"step {no_eta_end}<" in figures["attn_logit"]
    # a far ETA is clipped at three times the points' span past the last point (trend.max_reach), and named
    assert f"step {last + 3 * (last - first)}<" in figures["adam_eps"]
    assert f"ETA at step {fc['curve']['at_step'] + 1000} →" in figures["adam_eps"]
    assert "no chart: its curve has 2 steps but 1 values" in figures["log_z"]
    assert "no chart" in figures["out_rms"] and "watching" in figures["out_rms"]


def test_forecasts_of_the_supervisor_are_json_safe_and_name_what_is_missing() -> None:
    curve = {"steps": [1, 2, 3], "values": [1.0, 2.0, math.inf], "scale": "log", "slope": 0.7, "at_step": 3,
             "at_value": 4.0, "limit": 100.0}  # fmt: skip
    top = {
        "attn_logit": Forecast(
            "attn_logit", "h.0.attn", "attn_logit_max", 4.0, 3, 6.0, "warning", 0.8, "m", {"curve": curve}
        ),
        "out_rms": Forecast("out_rms", "h.0.mlp", "out_rms", math.nan, 3, None, None, 0.1, "n", {}),
        "log_z": Forecast("log_z", "z", "log_z_mean", 1.0, 3, 9.0, None, 0.2, "o", {"curve": {**curve, "scale": "x"}}),
    }
    status = RunStatus("r", 3, Risk(0.8, "x"), {}, top)
    got = forecasts(status)
    assert [f["predictor"] for f in got] == ["attn_logit", "log_z", "out_rms"]  # riskiest first
    assert got[0]["curve"]["values"] == [1.0, 2.0] and got[0]["curve_note"] is None  # the Inf cannot be drawn
    assert got[1]["curve"] is None and "scale is 'x'" in got[1]["curve_note"]
    assert got[2]["curve"] is None and got[2]["curve_note"] == "no curve in its evidence"
    assert json.loads(json.dumps(plain(got), allow_nan=False))[2]["value"] == "NaN"
    assert all(
        f["curve"] is None and "most recently updated" in f["curve_note"] for f in forecasts(status, curves=False)
    )


def test_routes_methods_and_unchanged_metrics(agent: Agent) -> None:
    _push(agent, [make_frames(run="m", step=3, scalars={"loss": 2.5})])
    assert parse_metrics(fetch(agent.metrics_url)).value("sentinel_loss", run="m") == 2.5
    status, headers, body = _get(_base(agent) + "nothing-here")
    assert status == 404 and b"/api/status" in body
    req = urllib.request.Request(_base(agent) + "api/status", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 405
    assert _get(_base(agent) + "favicon.ico")[0] == 204
    status, headers, _ = _get(_base(agent) + "api/status")
    assert headers["Content-Type"] == "application/json; charset=utf-8" and headers["Cache-Control"] == "no-store"


def test_page_links_and_fetch_work_behind_a_reverse_proxy_at_a_sub_path(agent: Agent) -> None:
    """A proxy serving the agent at /sentinel/: every URL the page uses must resolve under it."""
    _push(agent, [make_frames(run="p", step=1, scalars={"loss": 1.5})])
    upstream = _base(agent)

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self.path.startswith("/sentinel/"):
                self.send_error(404)
                return
            code, _, body = _get(upstream + self.path.removeprefix("/sentinel/"))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
    try:
        page_url = f"http://127.0.0.1:{proxy.server_port}/sentinel/"
        status, _, page = _get(page_url)
        assert status == 200
        urls = re.findall(r'(?:href="|fetch\(")([^"]+)"', page.decode())
        assert {"api/status", "metrics"} <= set(urls), urls
        for url in urls:
            status, _, body = _get(urllib.parse.urljoin(page_url, url))
            assert status == 200, url
        assert _strict_json(_get(urllib.parse.urljoin(page_url, "api/status"))[2])["runs"][0]["run"] == "p"
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_idle_and_slow_clients_do_not_stall_ingestion_or_other_clients(agent: Agent) -> None:
    port = agent.metrics_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    try:
        t0 = time.monotonic()
        _push(agent, [make_frames(run="busy", step=s, scalars={"loss": 1.0}) for s in range(300)], timeout=5.0)
        doc = _strict_json(_get(_base(agent) + "api/status")[2])
        assert doc["runs"][0]["step"] == 299
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in [*idle, half]:
            s.close()


def test_connections_beyond_the_limit_are_closed_not_queued() -> None:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = AgentHTTPServer("127.0.0.1", 0, app, timeout=0.5, max_connections=2)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        port = server.server_port
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(2)
        assert extra.recv(1) == b""  # closed at once
        extra.close()
        assert server.refused_connections == 1
        time.sleep(0.8)  # the held connections time out and free their slots
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"ok"
        for s in held:
            s.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_trickling_client_is_cut_off_at_the_deadline_and_metrics_stay_reachable() -> None:
    """A byte every 0.1 s never trips a per-read timeout of 0.6 s; the overall deadline does."""
    server = AgentHTTPServer(
        "127.0.0.1", 0, make_app(CollectorRegistry(), lambda: {}, render_page), timeout=0.6, max_connections=2
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    cut_after: list[float] = []

    def trickle() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.server_port)) as s:
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
            for byte in request:
                try:
                    s.sendall(bytes([byte]))
                    readable, _, _ = select.select([s], [], [], 0.1)
                    if readable and s.recv(1) == b"":
                        break
                except OSError:
                    break
            cut_after.append(time.monotonic() - t0)

    try:
        clients = [threading.Thread(target=trickle, daemon=True) for _ in range(2)]  # every slot taken
        for c in clients:
            c.start()
        for c in clients:
            c.join(10)
        assert len(cut_after) == 2 and all(0.5 < t < 2.0 for t in cut_after), cut_after
        deadline = time.monotonic() + 2
        while server.expired_connections < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the client sees the shutdown before the server's thread counts it
        assert server.expired_connections == 2
        status, _, body = _get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert status == 200 and b"python_info" not in body  # the agent's registry, served again
    finally:
        server.shutdown()
        server.server_close()


def test_a_failing_status_is_a_500_and_the_server_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def status() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"version": 1}

    server = AgentHTTPServer("127.0.0.1", 0, make_app(CollectorRegistry(), status, render_page))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/"
        status_code, _, body = _get(base + "api/status")
        assert status_code == 500 and b"boom" not in body and "boom" in caplog.text
        assert _strict_json(_get(base + "api/status")[2]) == {"version": 1}
        assert _get(base + "metrics")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_downsample_keeps_spikes_and_non_finite_values() -> None:
    steps = list(range(1000))
    values = [1.0] * 1000
    values[333], values[777] = 50.0, math.nan
    out = _downsample(steps, values, 100)
    assert len(out["steps"]) <= 102 and out["steps"][-1] == 999 and out["steps"] == sorted(out["steps"])
    assert 50.0 in out["values"] and 333 in out["steps"]
    assert 777 in out["steps"] and math.isnan(out["values"][out["steps"].index(777)])
    assert _downsample([1, 2], [3.0, 4.0], 100) == {"steps": [1, 2], "values": [3.0, 4.0]}


def test_fmt_is_four_significant_digits() -> None:
    cases = {0.0: "0", 4.5: "4.5", 2.549999952316284: "2.55", 12345.6: "12350", 0.0012345: "0.001234"}
    cases.update({1.5e-5: "1.5e-5", 123456789.0: "1.235e8", math.nan: "NaN", -math.inf: "-Infinity", None: "–"})
    assert {k: fmt(k) for k in cases} == cases


def test_risk_trail_follows_steps_and_forgets_a_rewind() -> None:
    trail = RiskTrail(supervisor=None, capacity=4)  # type: ignore[arg-type]  # record() only

    def snap(step: int, score: float) -> SupervisorSnapshot:
        return SupervisorSnapshot([RunStatus("a", step, Risk(score, "x"), {}, {})], {}, {}, {}, 0)

    for step, score in [(1, 0.1), (2, 0.2), (2, 0.25), (3, 0.3), (4, 0.4), (5, 0.5)]:
        trail.record(snap(step, score))
    assert trail.points("a") == ([2, 3, 4, 5], [0.25, 0.3, 0.4, 0.5])
    trail.record(snap(3, 0.9))  # the trainer went back to step 3
    assert trail.points("a") == ([2, 3], [0.25, 0.9])
    trail.record(SupervisorSnapshot([], {}, {}, {}, 0))  # run no longer tracked
    assert trail.points("a") == ([], [])


def test_event_summaries_name_what_happened() -> None:
    assert event_summary({"type": "decision", "reason": "loss_spike -> rollback"}) == "loss_spike -> rollback"
    assert "cooldown" in event_summary({"type": "suppressed", "why": "cooldown", "reason": "r"})
    assert "from step 9 to 5" in event_summary({"type": "rewind", "from_step": 9, "to_step": 5})
    assert "applied at step 7" in event_summary({"type": "ack", "status": "applied", "step": 7})
    assert "held" not in event_summary({"type": "undeliverable", "action": "stop", "why": "gone"})
    assert event_summary({"type": "agent_start", "version": "0.1.0", "pid": 3}) == "agent 0.1.0 started (pid 3)"


def test_the_server_chart_draws_a_rollback_apart_on_a_shared_range() -> None:
    import re as _re

    from agent.status_html import chart_svg, fmt_duration, fmt_ranks, timelines

    steps = [*range(0, 11), *range(5, 9)]
    values = [2.0] * 9 + [9.0, 9.0] + [2.1] * 4
    assert timelines(steps) == [False] * 5 + [True] * 6 + [False] * 4
    svg = chart_svg("loss", steps, values, (0, 20))
    lines = _re.findall(r'<polyline class="([^"]+)" points="([^"]+)"', svg)
    assert [cls for cls, _ in lines] == ["line", "line abandoned", "line"]
    for _, points in lines:
        xs = [float(p.split(",")[0]) for p in points.split()]
        assert xs == sorted(xs)  # no line goes back in steps: the spike is not joined to step 5
    assert ">step 20<" in svg and ">0<" in svg  # the run's shared range, not this chart's own
    assert fmt_duration(6.28e-4) == "0.628 ms" and fmt_duration(1.5) == "1.5 s" and fmt_duration(5e-5) == "50 µs"
    assert fmt_ranks([0]) == ("rank", "0") and fmt_ranks([0, 1, 2, 3]) == ("ranks", "4 (0…3)")
