"""The shipped Prometheus and Alertmanager configs pass the real promtool and amtool, point at
the agent's defaults, and route alerts by severity; the image's health check works on a real agent."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from agent_proc import require_binary

from agent.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "sentinel.rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DOCKERFILE = ROOT / "deploy" / "agent.Dockerfile"
_PYCACHE = shutil.ignore_patterns("__pycache__", "*.pyc")

pytestmark = pytest.mark.prometheus


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Checking {RULES}" in result.stdout, "rule_files must pick up the shipped rules"


def test_scrape_target_is_the_agent_default_address() -> None:
    jobs = yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == "sentinel-agent"]
    defaults = AgentConfig().metrics
    assert job["static_configs"][0]["targets"] == [f"{defaults.host}:{defaults.port}"]


def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = require_binary("amtool")
    result = subprocess.run([amtool, "check-config", str(ALERTMANAGER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _route(*labels: str) -> str:
    amtool = require_binary("amtool")
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_alerts_route_by_severity() -> None:
    assert _route("severity=critical", "alertname=SentinelAgentDown") == "pager"
    assert _route("severity=warning", "alertname=SentinelSpikeRiskHigh") == "chat"
    assert _route("alertname=Unlabelled") == "chat", "an alert without severity must still reach someone"


def test_every_rule_severity_has_a_route_and_no_receiver_points_anywhere_real() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    severities = {r["labels"]["severity"] for g in groups for r in g["rules"]}
    assert {_route(f"severity={s}") for s in severities} == {"pager", "chat"}
    urls = [h["url"] for r in yaml.safe_load(ALERTMANAGER.read_text())["receivers"] for h in r["webhook_configs"]]
    assert urls and all(".example.invalid/" in u for u in urls), "placeholders must not reach a real host"


def test_the_image_healthcheck_passes_on_a_running_agent(running_agent) -> None:
    """The HEALTHCHECK command, pointed at this agent's port, succeeds; at a closed port it fails."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    argv = json.loads(line.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"]
    default_url = f"http://127.0.0.1:{AgentConfig().metrics.port}/metrics"
    assert default_url in argv[2]
    check = argv[2].replace(default_url, running_agent.metrics_url)
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=30).returncode == 0
    closed = argv[2].replace(default_url, "http://127.0.0.1:1/metrics")
    assert subprocess.run([sys.executable, "-c", closed], capture_output=True, timeout=30).returncode != 0


def test_the_image_build_context_installs_every_package(tmp_path: Path) -> None:
    """`pip install .` on exactly what the Dockerfile copies yields every subpackage of the sources
    (a package missing from pyproject's list would only fail inside the image)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    context = tmp_path / "context"
    context.mkdir()
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            if dest.startswith("/"):
                continue  # configuration, not part of the package
            for src in sources:
                copy = shutil.copytree if (ROOT / src).is_dir() else shutil.copy
                copy(ROOT / src, context / Path(src).name, **({"ignore": _PYCACHE} if copy is shutil.copytree else {}))
    out = tmp_path / "wheel"
    # Offline when this environment has the build backend; otherwise pip fetches it, as the image build does.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = {str(Path(name).parent) for name in zf.namelist() if name.endswith("/__init__.py")}
    expected = {
        str(p.parent.relative_to(ROOT))
        for top in ("agent", "sentinel", "sentinel_contract")
        for p in (ROOT / top).rglob("__init__.py")
    }
    expected.add("sentinel/examples")
    assert expected <= packaged, f"missing from the installed package: {sorted(expected - packaged)}"
