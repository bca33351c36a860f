"""``sentinel demo``: train the tiny GPT on CPU with a live agent, the way a newcomer first sees it.

Starts ``sentinel-agent`` as a child process, prints its /metrics address as soon as it
listens, trains ``examples/tiny_gpt.py`` with sentinel attached, shows progress, and ends
with a summary of what went over the wire and what the agent decided.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from agent.spawn import AgentProcess


def _progress(total: int, stream=sys.stderr):
    start = time.perf_counter()
    last = [start]
    interactive = stream.isatty()

    def on_step(sn, loss: float) -> None:
        now = time.perf_counter()
        step_time, last[0] = now - last[0], now
        done = sn.step
        if not interactive and done % max(1, total // 10) and done != total:
            return
        width = 30
        filled = int(width * done / total)
        eta = (now - start) / done * (total - done)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{total}  loss {loss:.4f}  "
            f"{step_time:.3f} s/step  ETA {eta:4.0f} s"
        )
        stream.write(("\r" + line) if interactive else line + "\n")
        if interactive and done == total:
            stream.write("\n")
        stream.flush()

    return on_step


def _agent_counts(agent: AgentProcess) -> dict[str, float]:
    totals: dict[str, float] = {}
    try:
        families = text_string_to_metric_families(agent.metrics_text())
    except OSError:
        return totals
    for family in families:
        for sample in family.samples:
            if sample.name in (
                "sentinel_agent_received_messages_total",
                "sentinel_agent_rejected_messages_total",
                "sentinel_agent_decisions_total",
            ):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


@dataclass
class DemoResult:
    steps: int
    final_loss: float
    sent: int
    dropped: int
    agent: dict[str, float]
    seconds: float


def run_demo(steps: int, lr: float, metrics_port: int, seed: int = 0, out=sys.stdout) -> DemoResult:
    from sentinel.examples.tiny_gpt import TrainConfig, train

    with AgentProcess(metrics_port=metrics_port) as agent:
        print(f"agent up: metrics at {agent.metrics_url}  (statistics on {agent.stats_endpoint})", file=out, flush=True)
        counters: dict[str, int] = {}

        def on_step(sn, loss: float) -> None:
            counters.update(sn.counters)
            progress(sn, loss)

        progress = _progress(steps)
        start = time.perf_counter()
        config = {
            "run": "demo",
            "publish": {"endpoint": agent.stats_endpoint},
            "control": {"endpoint": agent.commands_endpoint},
        }
        losses = train(TrainConfig(steps=steps, lr=lr, seed=seed), sentinel_config=config, on_step=on_step)
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # let the last messages land before reading the agent's counters
        result = DemoResult(
            steps=len(losses),
            final_loss=losses[-1],
            sent=counters.get("sent", 0),
            dropped=counters.get("dropped", 0),
            agent=_agent_counts(agent),
            seconds=seconds,
        )
    rows = [
        ("steps", f"{result.steps}"),
        ("final loss", f"{result.final_loss:.4f}"),
        ("wall time", f"{result.seconds:.1f} s"),
        ("messages sent / dropped", f"{result.sent} / {result.dropped}"),
        (
            "agent received / rejected",
            "{:.0f} / {:.0f}".format(
                result.agent.get("sentinel_agent_received_messages_total", float("nan")),
                result.agent.get("sentinel_agent_rejected_messages_total", float("nan")),
            ),
        ),
        ("agent decisions so far", "{:.0f}".format(result.agent.get("sentinel_agent_decisions_total", float("nan")))),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nsummary", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    return result
