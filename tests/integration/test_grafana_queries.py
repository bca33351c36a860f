"""Every query of the Grafana dashboards and alert rules returns data from a real Prometheus.

A real agent (``sentinel-agent run``) is fed by a short tiny-GPT training run in this process
with sentinel attached, the probes on every step and all four optimizer transforms on (WeSaR,
ε auto-tuning, clamp, guard). Debian's Prometheus scrapes the agent every second. The
dashboards' queries, with the template variables replaced by this run's values as Grafana would
replace them, then run against that Prometheus over the run's time range (as a Grafana panel
does): each must return at least one series. The annotation queries (the agent's actions) must
too: the agent is given permissive predictor settings and a policy that answers every
detection with ``warn``, so decisions happen within seconds. The alert rules' queries are run
as instant queries and must be valid PromQL.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
import yaml
from agent_proc import fetch, parse_metrics, require_binary, start_prometheus
from sentinel.examples.tiny_gpt import GPT, BadRegion, GPTConfig, Windows, stdlib_corpus

import sentinel
from agent.spawn import AgentProcess

ROOT = Path(__file__).resolve().parents[2]
RUN = "grafana-e2e"
VARIABLES = {
    "$run": RUN,
    "$rank": "0",
    "$topk": "5",
    "$instance": ".+",  # the dashboards' "All" value
    "$__rate_interval": "10s",
    "$__interval": "10s",
}
AGENT_CONFIG = {
    "predict": {
        "loss": {"warmup": 16, "window": 16},
        "grad_norm": {"warmup": 16, "window": 16},
        # every trend gate open, so that a short healthy run fills the forecast panels
        "trend": {
            "min_points": 4,
            "min_t": 0.0,
            "window_steps": 8,
            "sustain": 0.0,
            "max_reach": 1e6,
            "warn_eta_steps": 100_000,
        },  # fmt: skip
        "attn_logit": {"watch_from": 0.0},
        "adam_eps": {"watch": 1e30},
        "out_rms": {"enabled": True, "watch_from": 1.0},
    },
    "policy": {"rules": [{"detector": "*", "severity": "warning", "action": "warn", "args": {}}]},
}
MIN_SECONDS = 6.0  # several scrapes at 1 s, so rate() and increase() see more than one sample


def _api(prom: str, path: str, **params: str) -> dict:
    body = json.loads(fetch(f"{prom}/api/v1/{path}?" + urllib.parse.urlencode(params), timeout=10))
    assert body["status"] == "success", body
    return body["data"]


def _substitute(promql: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        promql = promql.replace(name, VARIABLES[name])
    assert "$" not in promql, f"a template variable the test does not know: {promql}"
    return promql


def _train(agent: AgentProcess) -> None:
    """The tiny GPT (2 blocks, d=32) with probes and every transform on, for at least MIN_SECONDS."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    windows = Windows(stdlib_corpus(), cfg.block_size, 100_000, seed=0)
    # detections well after Prometheus's first scrapes of the run's counters (from 0), twice
    data = BadRegion(BadRegion(windows, 60 * 8, 65 * 8), 110 * 8, 115 * 8)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    config = {
        "run": RUN,
        "log_level": "warning",
        "publish": {"endpoint": agent.stats_endpoint},
        "control": {"endpoint": agent.commands_endpoint},
        "probes": {"enabled": True, "every": 1},
        "optim": {
            "guard": {"enabled": True},
            "wesar": {"enabled": True},
            "eps": {"enabled": True, "every": 1},
            "clamp": {"enabled": True, "default": 0.001},
        },
    }
    start = time.monotonic()
    with sentinel.attach(model, opt, config=config) as sn:
        for x, y in sn.batches(loader):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sn.observe(loss=loss)
            if sn.step >= 140 and time.monotonic() - start >= MIN_SECONDS:
                break
            time.sleep(0.02)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory):
    """(Prometheus URL, start, end) once a training run's metrics have been scraped."""
    tmp = tmp_path_factory.mktemp("grafana-queries")
    torch.set_num_threads(1)
    with AgentProcess(tmp / "agent", config=AGENT_CONFIG) as agent:
        target = urllib.parse.urlparse(agent.metrics_url).netloc
        prom, url = start_prometheus(tmp, [target])
        try:
            # the run's counters must be first seen at 0: train only once Prometheus scrapes the agent
            deadline = time.monotonic() + 30
            while not any(s["value"][1] == "1" for s in _api(url, "query", query='up{job="sentinel-agent"}')["result"]):
                assert time.monotonic() < deadline, "Prometheus never scraped the agent"
                time.sleep(0.25)
            start = time.time()
            _train(agent)
            time.sleep(0.5)  # the last messages reach the agent
            scrape = parse_metrics(agent.metrics_text())
            (last_step,) = [v for labels, v in scrape.samples("sentinel_training_step") if labels["run"] == RUN]
            deadline = time.monotonic() + 20
            query = f'sentinel_training_step{{run="{RUN}"}}'
            while not any(float(s["value"][1]) == last_step for s in _api(url, "query", query=query)["result"]):
                assert time.monotonic() < deadline, "Prometheus never scraped the run's last step"
                time.sleep(0.5)
            time.sleep(2.5)  # a couple more scrapes of the final counters
            yield url, start - 5, time.time()
        finally:
            prom.terminate()
            prom.wait(10)


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel or annotation, PromQL) for every query of the checked-in dashboards."""
    out = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.stem, f"{panel['title']} [{target['refId']}]", target["expr"]))
        for annotation in board["annotations"]["list"]:
            out.append((path.stem, f"annotation {annotation['name']}", annotation["expr"]))
    return out


@pytest.mark.prometheus
def test_every_dashboard_query_returns_a_series(scraped) -> None:
    prom, start, end = scraped
    queries = _dashboard_queries()
    assert len(queries) > 40
    empty = []
    for board, where, promql in queries:
        data = _api(prom, "query_range", query=_substitute(promql), start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        if not data["result"]:
            empty.append(f"{board} / {where}: {_substitute(promql)}")
    assert not empty, "queries with no series:\n" + "\n".join(empty)


@pytest.mark.prometheus
def test_template_variables_list_the_run(scraped) -> None:
    prom, start, end = scraped
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            # label_values(METRIC, LABEL): Grafana asks /api/v1/label/LABEL/values?match[]=METRIC
            metric, label = variable["query"][len("label_values(") : -1].rsplit(",", 1)
            values = _api(
                prom,
                f"label/{label.strip()}/values",
                **{"match[]": _substitute(metric.strip()), "start": f"{start:.3f}", "end": f"{end:.3f}"},
            )
            expected = {"run": RUN, "rank": "0"}.get(variable["name"])
            assert values and (expected is None or expected in values), (path.name, variable["name"], values)


@pytest.mark.prometheus
def test_alert_rule_queries_are_valid_promql(scraped) -> None:
    prom, _, _ = scraped
    rules = yaml.safe_load((ROOT / "grafana/provisioning/alerting/sentinel.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        (source,) = [q for q in rule["data"] if q["datasourceUid"] == "sentinel-prometheus"]
        _api(prom, "query", query=source["model"]["expr"])  # asserts status success
    risk = next(r for r in rules if r["uid"] == "sentinel-spike-risk")
    (source,) = [q for q in risk["data"] if q["datasourceUid"] == "sentinel-prometheus"]
    assert _api(prom, "query", query=source["model"]["expr"])["result"], "spike risk has a series for the run"


def _grafana_rules_as_prometheus_rules() -> dict:
    """Each Grafana rule as a Prometheus alerting rule: query A compared with threshold C (no ``for``)."""
    rules = yaml.safe_load((ROOT / "grafana/provisioning/alerting/sentinel.yml").read_text())["groups"][0]["rules"]
    out = []
    for rule in rules:
        refs = {q["refId"]: q for q in rule["data"]}
        (condition,) = refs["C"]["model"]["conditions"]
        op = {"gt": ">", "lt": "<"}[condition["evaluator"]["type"]]
        (threshold,) = condition["evaluator"]["params"]
        out.append({"alert": rule["uid"], "expr": f"({refs['A']['model']['expr']}) {op} {threshold}"})
    return {"groups": [{"name": "grafana", "rules": out}]}


@pytest.mark.prometheus
def test_grafana_counter_and_silence_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool evaluates the rules' PromQL: counters born above 0 fire; a run silent for over an hour does not.

    Run "late" appears at minute 2 with NaNs already counted and 40 of 100 messages dropped (a
    trainer that started before its agent): increase() over its samples is 0, so only the
    new-series branch can fire. Run "steady" has counted since 0 and stays quiet; run "old" last
    spoke at 0 s: trainer-silent fires at 10 minutes and is quiet again after an hour.
    """
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_grafana_rules_as_prometheus_rules(), sort_keys=False))
    labels = 'job="sentinel-agent",instance="127.0.0.1:9477",rank="0"'
    series = [
        (f'sentinel_agent_nonfinite_values_total{{{labels},run="late"}}', "_ _ 3x80"),
        (f'sentinel_agent_nonfinite_values_total{{{labels},run="steady"}}', "0x82"),
        (f'sentinel_trainer_dropped_messages_total{{{labels},run="late"}}', "_ _ 40x80"),
        (f'sentinel_trainer_sent_messages_total{{{labels},run="late"}}', "_ _ 60+10x80"),
        (f'sentinel_trainer_dropped_messages_total{{{labels},run="steady"}}', "0x82"),
        (f'sentinel_trainer_sent_messages_total{{{labels},run="steady"}}', "0+10x82"),
        (f'sentinel_last_message_timestamp_seconds{{{labels},run="old"}}', "0x82"),
    ]

    def case(minute: int, alert: str, runs: list[str]) -> dict:
        return {
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {"run": r, "rank": "0"} if alert == "sentinel-trainer-silent" else {"run": r}}
                           for r in runs],
        }  # fmt: skip

    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    case(3, "sentinel-nonfinite", ["late"]),
                    case(30, "sentinel-nonfinite", []),
                    case(3, "sentinel-messages-dropped", ["late"]),
                    case(30, "sentinel-messages-dropped", []),
                    case(10, "sentinel-trainer-silent", ["old"]),
                    case(70, "sentinel-trainer-silent", []),
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", str(tmp_path / "tests.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
