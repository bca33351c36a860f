"""The shipped alert rules: valid for promtool, unit-tested, and firing for real.

`promtool test rules` runs deploy/prometheus/tests/*.yml (input series -> expected alerts); these
tests also check that every alert has a firing and a quiet case there, that the cases notice a
changed rule, and that the rules, loaded into a real Prometheus scraping a real agent, raise an
alert that the shipped Alertmanager routing delivers to the right webhook.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from agent_proc import Pusher, fetch, free_port, make_frames, require_binary, serve, start_prometheus

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "sentinel.rules.yml"
TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

pytestmark = pytest.mark.prometheus


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_promtool_check_rules_accepts_every_rule() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert TESTS, "no promtool test files under deploy/prometheus/tests"
    result = _promtool("test", "rules", *map(str, TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"
    assert (firing | quiet) - alerts == set(), "test cases for alerts that do not exist"


MUTATIONS = [
    ("SentinelSpikeRiskHigh", "> 0.8", "> 0.95"),
    ("SentinelAttentionLogitGrowth", "< 200", "< 100"),
    ("SentinelNoStatistics", "> 300", "> 900"),
    ("SentinelNoStatistics", "< 3600", "< 36000"),
    ("SentinelNoStatistics", "severity: warning", "severity: critical"),
    ("SentinelTrainerDroppingMessages", "offset 10m", "offset 1m"),
    ("SentinelAutomaticRecovery", "rollback|", ""),
    ("SentinelAgentDown", "== 0", "== 1"),
    ("SentinelAdamEpsilonAtFloor", "<= 1.1e-16", "<= 1e-17"),
    ("SentinelUpdateClampContinuous", "for: 15m", "for: 30m"),
]


@pytest.mark.parametrize(("alert", "old", "new"), MUTATIONS, ids=[f"{m[0]}:{m[1]}" for m in MUTATIONS])
def test_unit_tests_notice_a_changed_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    """A rule edited in a way that changes when it fires makes `promtool test rules` fail."""
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    end = text.find("- alert:", start + 1)
    end = len(text) if end < 0 else end
    block = text[start:end]
    assert old in block
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(text[:start] + block.replace(old, new, 1) + text[end:])
    (tmp_path / "tests").mkdir()
    copies = []
    for path in TESTS:
        copies.append(tmp_path / "tests" / path.name)
        copies[-1].write_text(path.read_text())
    result = _promtool("test", "rules", *map(str, copies))
    assert result.returncode != 0, f"changing {old!r} to {new!r} in {alert} went unnoticed"
    assert alert in result.stdout + result.stderr


# --- live: agent -> Prometheus (shipped rules) -> Alertmanager (shipped routes) -> webhook --------


class _Webhook:
    """A loopback HTTP server standing in for the pager and chat webhooks; keeps what it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict]:
        return [a for p, body in list(self.received) if p == path for a in body["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def alert_stack(tmp_path: Path, running_agent) -> Iterator[tuple[object, str, _Webhook]]:
    """Real Alertmanager with the shipped routes (webhook URLs pointed at a local server, waits
    shortened) and real Prometheus with the shipped rules, scraping the running agent."""
    webhook = _Webhook()
    am_cfg = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in am_cfg["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook.url}/{receiver['name']}"
    am_cfg["route"].update(group_wait="0s", group_interval="1s")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_cfg))
    am_port = free_port()
    am = serve(
        [
            require_binary("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        ],
        f"http://127.0.0.1:{am_port}/-/ready",
        tmp_path / "alertmanager.log",
    )
    procs = [am]
    try:
        target = urllib.parse.urlparse(running_agent.metrics_url).netloc
        prom, url = start_prometheus(
            tmp_path,
            [target],
            rule_files=[str(RULES)],
            alerting={"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        )
        procs.append(prom)
        yield running_agent, url, webhook
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        webhook.close()


def _wait_for_series(prom: str, promql: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    while not json.loads(fetch(url))["data"]["result"]:
        assert time.monotonic() < deadline, f"Prometheus never returned {promql}"
        time.sleep(0.2)


def test_every_metric_in_the_rules_is_exported_by_the_agent(running_agent) -> None:
    text = fetch(running_agent.metrics_url)
    exported = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    for name, rule in _alerts().items():
        for metric in re.findall(r"\b(sentinel_[a-z0-9_]+)", rule["expr"]):
            assert metric in exported, f"{name} uses {metric}, which the agent does not export"


def test_shipped_rules_fire_on_a_live_agent_and_route_to_chat(alert_stack) -> None:
    agent, prom, webhook = alert_stack
    with Pusher(agent.stats_endpoint) as push:
        push.send(make_frames(run="live", step=0, scalars={"loss": 2.0}, dropped=0))
        # increase() needs Prometheus to have seen the counters at their starting values first.
        _wait_for_series(prom, 'sentinel_trainer_dropped_messages_total{run="live"} == 0')
        _wait_for_series(prom, 'sentinel_agent_rejected_messages_total{reason="frame_count"} == 0')
        push.send(make_frames(run="live", step=1, scalars={"loss": 2.0}, dropped=3))
        push.send([b"not a sentinel message"])
        agent.wait_for(lambda s: s.value("sentinel_agent_rejected_messages_total", reason="frame_count") == 1)

    wanted = {"SentinelTrainerDroppingMessages", "SentinelAgentRejectingMessages"}
    deadline = time.monotonic() + 45
    while {a["labels"]["alertname"] for a in webhook.alerts("/chat")} < wanted:
        assert time.monotonic() < deadline, (
            f"chat webhook got {webhook.received}; Prometheus alerts: {fetch(prom + '/api/v1/alerts')}"
        )
        time.sleep(0.3)
    by_name = {a["labels"]["alertname"]: a for a in webhook.alerts("/chat")}
    dropped = by_name["SentinelTrainerDroppingMessages"]
    assert dropped["status"] == "firing"
    assert (
        dropped["labels"] | {"severity": "warning", "run": "live", "rank": "0", "job": "sentinel-agent"}
        == dropped["labels"]
    )
    # increase() extrapolates to the window's edges, so the count shown is at least the true 3.
    m = re.fullmatch(r"Run live rank 0 dropped (\d+) statistics messages in 10m", dropped["annotations"]["summary"])
    assert m and int(m.group(1)) >= 3, dropped["annotations"]
    rejected = by_name["SentinelAgentRejectingMessages"]
    assert rejected["labels"]["reason"] == "frame_count"
    assert rejected["annotations"]["runbook"] == "docs/operations.md#sentinelagentrejectingmessages"
    assert webhook.alerts("/pager") == [], "warnings must not page"
