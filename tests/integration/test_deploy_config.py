"""The shipped Prometheus config is valid for the real promtool and points at the agent's defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from agent_proc import require_binary

from agent.config import AgentConfig

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"


def test_promtool_accepts_the_scrape_config() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_target_is_the_agent_default_address() -> None:
    jobs = yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    (job,) = [j for j in jobs if j["job_name"] == "sentinel-agent"]
    defaults = AgentConfig().metrics
    assert job["static_configs"][0]["targets"] == [f"{defaults.host}:{defaults.port}"]
