"""The checked-in Grafana files are exactly what grafana/generate.py writes, and they hang together.

Every query's metric must be one the agent exports (docs/metrics.md, or a probe family of the
shared contract), every panel must use the provisioned datasource, and the alert rules'
conditions must name one of their queries. tests/integration/test_grafana_queries.py runs the
queries themselves against a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
PROBE_FAMILIES = {
    "sentinel_layer_output_rms",
    "sentinel_layer_output_l2_norm",
    "sentinel_layer_attention_logit_max",
    "sentinel_layer_residual_std",
    "sentinel_layer_log_z_max",
    "sentinel_layer_log_z_mean",
}


def _generator():
    if sys.version_info < (3, 11):
        pytest.skip("grafana-foundation-sdk needs Python 3.11")
    spec = importlib.util.spec_from_file_location("sentinel_grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def generator():
    return _generator()


@pytest.fixture(scope="module")
def boards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def _panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def _exprs(board: dict) -> list[str]:
    out = [t["expr"] for p in _panels(board) for t in p["targets"]]
    return out + [a["expr"] for a in board["annotations"]["list"]]


def test_checked_in_files_are_the_generators_output(generator) -> None:
    assert generator.stale() == [], "run: python grafana/generate.py"
    rendered = generator.render()
    on_disk = {
        str(p.relative_to(GRAFANA))
        for p in GRAFANA.rglob("*")
        if p.is_file() and p.suffix in (".json", ".yml") and p.parent != GRAFANA
    }
    assert on_disk == set(rendered), "a file under grafana/ that the generator does not write"


def test_check_mode_reports_a_stale_file(generator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check", "--out", str(tmp_path)]) == 0
    path = tmp_path / "dashboards" / "per-layer.json"
    path.write_text(path.read_text().replace("Update ratio", "Update ratio (edited by hand)", 1))
    capsys.readouterr()
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1
    assert "per-layer.json" in capsys.readouterr().err


def test_four_dashboards_with_run_and_rank_variables(boards: dict[str, dict]) -> None:
    assert set(boards) == {"run-overview.json", "per-layer.json", "optimizer.json", "agent-health.json"}
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == 4
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"run", "rank"} <= set(variables), name
        assert variables["run"]["query"] == "label_values(sentinel_training_step, run)"
        assert "$run" in variables["rank"]["query"]
        for v in variables.values():
            if v["type"] == "query":
                assert v["datasource"] == {"type": "prometheus", "uid": "sentinel-prometheus"}


def test_panels_are_complete(boards: dict[str, dict]) -> None:
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in _panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["datasource"]["uid"] == "sentinel-prometheus", where
            assert isinstance(panel["options"], dict), f"{where}: no options"
            assert panel["description"], where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)) and all(refs), where
            for target in panel["targets"]:
                assert target["expr"].strip() and target["datasource"]["uid"] == "sentinel-prometheus", where


def test_queries_use_exported_metrics_and_the_variables(boards: dict[str, dict]) -> None:
    documented = set(re.findall(r"`(sentinel_[a-z0-9_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
    known = documented | PROBE_FAMILIES
    for name, board in boards.items():
        for promql in _exprs(board):
            for metric in re.findall(r"\bsentinel_[a-z0-9_]+", promql):
                assert metric in known, f"{name}: {metric} is neither in docs/metrics.md nor a probe family"
            if re.search(r"sentinel_(loss|grad_norm|param_|layer_|training_step)", promql):
                assert 'run="$run"' in promql and 'rank="$rank"' in promql, f"{name}: {promql}"


def test_run_overview_has_the_agents_actions_as_annotations(boards: dict[str, dict]) -> None:
    annotations = {a["name"]: a for a in boards["run-overview.json"]["annotations"]["list"]}
    actions = annotations["Agent actions"]
    assert actions["enable"] and "sentinel_agent_actions_total" in actions["expr"]
    assert actions["datasource"]["uid"] == "sentinel-prometheus" and actions["tagKeys"] == "action"
    titles = {p["title"] for p in _panels(boards["run-overview.json"])}
    assert {"Loss", "Gradient norm", "Spike risk", "ETA to limit"} <= titles


def test_annotations_use_the_rate_interval_and_the_agent_variable(boards: dict[str, dict]) -> None:
    """increase() over $__interval is empty once zoomed in below two scrapes; $__rate_interval never is."""
    for name, board in boards.items():
        variables = {v["name"] for v in board["templating"]["list"]}
        for annotation in board["annotations"]["list"]:
            if "expr" not in annotation:
                continue
            assert "$__interval" not in annotation["expr"] and "[$__rate_interval]" in annotation["expr"], name
            if annotation["name"] == "Agent actions":
                assert ('instance=~"$instance"' in annotation["expr"]) == ("instance" in variables), name
    assert "instance" in {v["name"] for v in boards["agent-health.json"]["templating"]["list"]}


def test_alert_rules_are_well_formed() -> None:
    data = yaml.safe_load((GRAFANA / "provisioning/alerting/sentinel.yml").read_text())
    assert data["apiVersion"] == 1
    (group,) = data["groups"]
    assert group["folder"] == "LLM Sentinel" and group["interval"] == "1m"
    uids = [r["uid"] for r in group["rules"]]
    assert len(uids) == len(set(uids)) >= 6
    for rule in group["rules"]:
        refs = {q["refId"]: q for q in rule["data"]}
        assert rule["condition"] in refs, rule["uid"]
        assert refs["A"]["datasourceUid"] == "sentinel-prometheus" and refs["A"]["model"]["instant"]
        threshold = refs[rule["condition"]]
        assert threshold["datasourceUid"] == "__expr__" and threshold["model"]["expression"] == "A"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
    titles = {r["title"] for r in group["rules"]}
    assert {"Spike risk high", "Run stopped by the agent", "Agent cannot write its event log"} <= titles


def test_provisioning_files_match_the_deploy_paths() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/sentinel.yml").read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("sentinel-prometheus", "prometheus", "http://prometheus:9090")
    ]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/sentinel.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert all(d["isDefault"] is False for d in datasources), "a Grafana may already provision a default datasource"


def test_dashboards_and_alert_rules_name_their_folder_the_same_way() -> None:
    """Alerting provisioning resolves its folder by title and creates it with a uid of Grafana's choosing.

    A dashboard provider naming a folderUid for the same title would then clash with it (a second
    folder, or "a folder with the same name already exists"), so both name the folder by title only.
    """
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/sentinel.yml").read_text())["providers"]
    (group,) = yaml.safe_load((GRAFANA / "provisioning/alerting/sentinel.yml").read_text())["groups"]
    assert "folderUid" not in provider and "folderUID" not in group
    assert provider["folder"] == group["folder"] == "LLM Sentinel"
