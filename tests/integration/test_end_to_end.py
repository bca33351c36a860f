"""The whole spine with real components: trainer process → ZeroMQ → agent → Prometheus server.

Nothing here is mocked: the trainer is a separate Python process using ``sentinel.attach``,
the agent is ``python -m agent run``, and Prometheus is Debian's server, started on loopback
with a scrape config pointing at the agent.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from agent_proc import fetch, start_prometheus

TRAINER = str(Path(__file__).resolve().parents[1] / "trainer_proc.py")


def _train(tmp_path: Path, endpoint: str, run: str, **kwargs: object) -> subprocess.Popen:
    out = tmp_path / f"{run}.json"
    cmd = [sys.executable, TRAINER, "--endpoint", endpoint, "--run", run, "--out", str(out)]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.out_path = out  # type: ignore[attr-defined]
    return proc


def _report(proc: subprocess.Popen, timeout: float = 120) -> dict:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode(errors="replace")
    return json.loads(proc.out_path.read_text())  # type: ignore[attr-defined]


@pytest.fixture
def prometheus(tmp_path: Path, running_agent):
    """A real Prometheus server on loopback scraping the running agent every second."""
    target = urllib.parse.urlparse(running_agent.metrics_url).netloc
    proc, url = start_prometheus(tmp_path, [target])
    yield url
    proc.terminate()
    proc.wait(10)


def _query(prom: str, promql: str) -> list[dict]:
    body = json.loads(fetch(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.prometheus
def test_loss_reaches_prometheus(tmp_path: Path, running_agent, prometheus: str) -> None:
    report = _report(_train(tmp_path, running_agent.stats_endpoint, "e2e", steps=60, min_seconds=4))
    assert report["counters"]["dropped"] <= 2  # at most the sends before the connection came up

    scrape = running_agent.scrape()
    assert scrape.value("sentinel_loss", run="e2e", rank="0") == pytest.approx(report["losses"][-1], rel=1e-6)
    steps = len(report["losses"])
    assert scrape.value("sentinel_training_step", run="e2e", rank="0") == steps - 1
    assert scrape.value("sentinel_param_update_ratio", run="e2e", rank="0", param="0.weight") > 0

    deadline = time.monotonic() + 30
    while not (series := _query(prometheus, 'sentinel_loss{run="e2e"}')) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert series, "Prometheus never returned the trainer's loss series"
    assert series[0]["metric"]["rank"] == "0"
    # Once the run is over the agent keeps exporting the last loss: Prometheus must converge to it.
    deadline = time.monotonic() + 10
    while float(_query(prometheus, 'sentinel_loss{run="e2e"}')[0]["value"][1]) != pytest.approx(
        report["losses"][-1], rel=1e-6
    ):
        assert time.monotonic() < deadline, "Prometheus does not hold the trainer's final loss"
        time.sleep(0.5)
    over_time = _query(prometheus, 'count_over_time(sentinel_loss{run="e2e"}[5m])')
    assert float(over_time[0]["value"][1]) >= 2, "expected a series of samples, not one"


def _phase_median(times: list[float], start: float, end: float) -> tuple[float, int]:
    durations = [b - a for a, b in zip(times, times[1:]) if start <= a and b <= end]
    return statistics.median(durations), len(durations)


def test_agent_killed_and_restarted_mid_run(tmp_path: Path, running_agent) -> None:
    """The trainer never waits for a dead agent, counts the drops, and reconnects by itself."""
    trainer = _train(tmp_path, running_agent.stats_endpoint, "restart", steps=10, min_seconds=9, width=384)
    running_agent.wait_for(lambda s: (s.value("sentinel_training_step", run="restart", rank="0") or 0) > 20, 30)
    killed_at = time.time()
    running_agent.kill()
    time.sleep(3.0)
    restarted_at = time.time()
    running_agent.restart()
    # The restarted agent knows the run's last recorded step at once (warm start); wait for a new message.
    after = running_agent.wait_for(lambda s: (s.value("sentinel_agent_received_messages_total") or 0) > 0, 30)
    report = _report(trainer)

    first_step_after = after.value("sentinel_training_step", run="restart", rank="0")
    alive, n_alive = _phase_median(report["times"], 0, killed_at)
    dead, n_dead = _phase_median(report["times"], killed_at, restarted_at)
    assert n_alive > 10 and n_dead > 10, (n_alive, n_dead)
    # Within noise: a dead agent must not add anything measurable to a step.
    assert dead < alive * 1.3 + 0.002, f"median step {dead * 1e3:.2f} ms with the agent dead vs {alive * 1e3:.2f} ms"
    assert max(b - a for a, b in zip(report["times"], report["times"][1:])) < 1.0, "a step stalled"

    counters = report["counters"]
    assert counters["dropped"] >= n_dead - 1, counters
    assert counters["sent"] + counters["dropped"] == len(report["losses"])
    final = running_agent.scrape()
    assert first_step_after > len([t for t in report["times"] if t < restarted_at]) - 1
    assert final.value("sentinel_training_step", run="restart", rank="0") == len(report["losses"]) - 1
    assert final.value("sentinel_trainer_dropped_messages_total", run="restart", rank="0") == counters["dropped"]
