"""deploy/prometheus/prometheus-agent.yml: promtool accepts it in agent mode, and a real agent-mode
Prometheus running it (only the addresses changed) forwards a real sentinel agent's series through
remote_write to a store (a Prometheus with its remote-write receiver on), with the labels that join
them to DCGM's GPU metrics: `node` and the rest of the external labels, `local_rank` for rank 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from agent_proc import Pusher, fetch, free_port, make_frames, require_binary, serve

from agent.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
AGENT_MODE = ROOT / "deploy" / "prometheus" / "prometheus-agent.yml"

pytestmark = pytest.mark.prometheus


def _feature_flags() -> list[str]:
    """The flags that turn on agent mode (and env expansion in external labels) for the installed
    Prometheus: `--agent` from 3.0, `--enable-feature=agent` before."""
    prometheus = require_binary("prometheus")
    result = subprocess.run([prometheus, "--help"], capture_output=True, text=True)
    help_text = result.stdout + result.stderr
    if re.search(r"--(\[no-\])?agent(?![.\w-])", help_text):
        return ["--agent"]
    assert "agent," in help_text or "agent " in help_text, "this Prometheus has no agent mode"
    return ["--enable-feature=agent,expand-external-labels"]


def test_promtool_accepts_the_agent_mode_config_and_it_is_agent_only() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", "--agent", str(AGENT_MODE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = yaml.safe_load(AGENT_MODE.read_text())
    assert not {"rule_files", "alerting"} & set(cfg), "agent mode evaluates no rules; the store's ruler does"
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "sentinel-agent", "the alert rules expect this job name"
    defaults = AgentConfig().metrics
    assert job["static_configs"] == [{"targets": [f"{defaults.host}:{defaults.port}"]}]
    (remote,) = cfg["remote_write"]
    assert ".example.invalid/" in remote["url"], "the placeholder must not reach a real host"
    assert remote["url"].startswith("https://") and remote["authorization"]["credentials_file"]


def _query(prom: str, promql: str) -> list[dict]:
    body = json.loads(fetch(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_agent_mode_forwards_the_agent_series_with_the_join_labels(tmp_path: Path, running_agent) -> None:
    prometheus = require_binary("prometheus")
    flags = _feature_flags()
    # The store: a plain Prometheus server accepting remote writes.
    store_port = free_port()
    store = serve(
        [
            prometheus,
            f"--config.file={_write(tmp_path / 'store.yml', {'global': {}})}",
            f"--storage.tsdb.path={tmp_path / 'store-tsdb'}",
            f"--web.listen-address=127.0.0.1:{store_port}",
            "--web.enable-remote-write-receiver",
        ],
        f"http://127.0.0.1:{store_port}/-/ready",
        tmp_path / "store.log",
    )
    store_url = f"http://127.0.0.1:{store_port}"
    # The shipped config, with only the addresses changed: this agent's port, this store, no TLS.
    cfg = yaml.safe_load(AGENT_MODE.read_text())
    cfg["global"]["scrape_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [urllib.parse.urlparse(running_agent.metrics_url).netloc]}]
    (remote,) = cfg["remote_write"]
    remote["url"] = f"{store_url}/api/v1/write"
    del remote["authorization"], remote["tls_config"]
    remote["queue_config"]["batch_send_deadline"] = "1s"
    env = {
        **os.environ,
        "SENTINEL_CLUSTER": "test-cluster",
        "POD_NAMESPACE": "training",
        "POD_NAME": "llm-training-leader-0-0",
        "NODE_NAME": "gpu-node-17",
    }
    agent_port = free_port()
    log = tmp_path / "agent-mode.log"
    with open(log, "wb") as out:
        agent_mode = subprocess.Popen(
            [
                prometheus,
                *flags,
                f"--config.file={_write(tmp_path / 'agent-mode.yml', cfg)}",
                f"--storage.agent.path={tmp_path / 'wal'}",
                f"--web.listen-address=127.0.0.1:{agent_port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with Pusher(running_agent.stats_endpoint) as push:
            push.send(make_frames(run="multi", rank=0, step=3, scalars={"loss": 2.5}))
        deadline = time.monotonic() + 60
        while not (series := _query(store_url, 'sentinel_loss{run="multi"}')):
            assert agent_mode.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no sample reached the store:\n" + log.read_text()
            time.sleep(0.5)
        (loss,) = series
        labels = loss["metric"]
        assert float(loss["value"][1]) == 2.5
        assert labels["job"] == "sentinel-agent" and labels["rank"] == "0"
        assert labels["local_rank"] == "0", "rank 0 is local rank 0 of the leader node"
        assert labels["node"] == "gpu-node-17", "the node label joins with DCGM's Hostname"
        assert (labels["cluster"], labels["namespace"], labels["pod"]) == (
            "test-cluster",
            "training",
            "llm-training-leader-0-0",
        )
        # Agent-wide series get the external labels but no local_rank (they belong to no rank);
        # `up` reaches the store too, which SentinelAgentDown needs in the store's ruler.
        (up,) = _query(store_url, 'up{job="sentinel-agent"}')
        assert up["metric"]["node"] == "gpu-node-17" and "local_rank" not in up["metric"]
        assert _query(store_url, "sentinel_agent_build_info") and all(
            "local_rank" not in s["metric"] for s in _query(store_url, "sentinel_agent_build_info")
        )
        # Agent mode answers no queries: the data lives only in the store.
        with pytest.raises(OSError):
            fetch(f"http://127.0.0.1:{agent_port}/api/v1/query?query=up")
    finally:
        agent_mode.terminate()
        store.terminate()
        agent_mode.wait(10)
        store.wait(10)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
