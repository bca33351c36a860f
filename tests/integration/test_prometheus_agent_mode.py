"""deploy/prometheus/prometheus-agent.yml: promtool accepts it in agent mode, and a real agent-mode
Prometheus running it (only the addresses changed) forwards a real sentinel agent's series through
remote_write to a store (a Prometheus with its remote-write receiver on), with the labels that join
them to DCGM's GPU metrics: `node` and the rest of the external labels, `local_rank` for rank 0."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from agent_proc import Pusher, fetch, free_port, make_frames, require_binary, serve

from agent.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
AGENT_MODE = ROOT / "deploy" / "prometheus" / "prometheus-agent.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
# What DCGM exporter serves for two GPUs of the node (its labels as dcgm-exporter 3.x/4.x sets them).
DCGM_TEXT = """# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA H200",Hostname="gpu-node-17"} 87
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-1",device="nvidia1",modelName="NVIDIA H200",Hostname="gpu-node-17"} 12
"""

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


@pytest.fixture
def fake_dcgm() -> Iterator[str]:
    """A loopback HTTP server answering /metrics with DCGM_TEXT; yields host:port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = DCGM_TEXT.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _documented_join() -> str:
    """The PromQL of docs/operations.md, "Joining training ranks to DCGM's GPU metrics"."""
    section = OPERATIONS.read_text().split("#### Joining training ranks to DCGM's GPU metrics", 1)[1]
    return section.split("```promql\n", 1)[1].split("```", 1)[0]


def test_agent_mode_forwards_the_agent_series_with_the_join_labels(
    tmp_path: Path, running_agent, fake_dcgm: str
) -> None:
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
    # The cluster's DCGM scrape, as docs/operations.md asks for it (Hostname kept as is).
    cfg["scrape_configs"].append(
        {"job_name": "dcgm-exporter", "scrape_interval": "1s", "static_configs": [{"targets": [fake_dcgm]}]}
    )
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
                "--storage.remote.flush-deadline=2s",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with Pusher(running_agent.stats_endpoint) as push:
            push.send(make_frames(run="multi", rank=0, step=3, scalars={"loss": 2.5, "step_duration_seconds": 0.25}))
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
        # The documented join labels rank 0's GPU (gpu 0 of its node) with its run and rank, and
        # only that GPU: gpu 1 of the same node runs no rank that publishes.
        deadline = time.monotonic() + 30
        while not (joined := _query(store_url, _documented_join())):
            assert time.monotonic() < deadline, "the documented DCGM join returned nothing"
            time.sleep(0.5)
        (gpu,) = joined
        assert float(gpu["value"][1]) == 87
        assert (gpu["metric"]["run"], gpu["metric"]["rank"]) == ("multi", "0")
        assert (gpu["metric"]["node"], gpu["metric"]["local_rank"], gpu["metric"]["UUID"]) == (
            "gpu-node-17",
            "0",
            "GPU-0",
        )
        # Agent mode answers no queries: the data lives only in the store.
        with pytest.raises(OSError):
            fetch(f"http://127.0.0.1:{agent_port}/api/v1/query?query=up")
    finally:  # the agent first: it flushes to the store on the way out (bounded by flush-deadline)
        for proc in (agent_mode, store):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
