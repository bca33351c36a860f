"""``sentinel demo``: train the tiny GPT on CPU with a live agent, the way a newcomer first sees it.

Starts ``sentinel-agent`` as a child process, prints its /metrics address as soon as it
listens, trains ``examples/tiny_gpt.py`` with sentinel attached, shows progress, and ends
with a summary of what went over the wire and what the agent decided, and the run report
(``sentinel-agent report``, docs/report.md) written from the agent's files, with its path.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    actions: list[str] = field(default_factory=list)
    report: Path | None = None


def _actions(events_path: str | None) -> list[str]:
    """One line per decision the agent recorded and per acknowledgement the trainer sent."""
    if not events_path or not Path(events_path).exists():
        return []
    lines = []
    for raw in Path(events_path).read_text().splitlines():
        event = json.loads(raw)
        if event.get("type") == "decision":
            for c in event.get("commands", []):
                lines.append(f"step {event['step']}: {c['action']} {c['args']} ({event.get('detector')})")
        elif event.get("type") == "ack":
            lines.append(f"step {event['step']}: trainer {event['status']} {event.get('detail', '')}".rstrip())
    return lines


def _report(agent_dir: Path, report_dir: Path, out) -> Path | None:
    """Keep the agent's files in ``report_dir/agent-state`` and write the report from them."""
    state = report_dir / "agent-state"
    state.mkdir(parents=True, exist_ok=True)
    for path in sorted(agent_dir.glob("*/*.jsonl")):
        shutil.copy2(path, state / path.name)
    try:
        from agent.report import MatplotlibMissing, ReportError, build_report

        result = build_report([state], report_dir / "report.html", title="llm-sentinel demo run report")
    except (ImportError, MatplotlibMissing, ReportError) as exc:
        print(f"\nrun report not written: {exc}", file=out)
        return None
    return result.html


def run_demo(
    steps: int,
    lr: float,
    metrics_port: int,
    seed: int = 0,
    inject_spike: bool = False,
    out=sys.stdout,
    report_dir: str | Path | None = None,
) -> DemoResult:
    """Train, summarise, and write the run report to ``report_dir`` (default: a new directory under /tmp)."""
    from sentinel.examples.tiny_gpt import TrainConfig, train

    workdir = tempfile.TemporaryDirectory(prefix="sentinel-demo-")
    with workdir, AgentProcess(Path(workdir.name) / "agent", metrics_port=metrics_port) as agent:
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
        bad = None
        if inject_spike:
            bad = (steps // 2, steps // 2 + 20)
            config["checkpoint"] = {"dir": str(Path(workdir.name) / "checkpoints"), "every": 50, "good_after": 20}
            print(
                f"injecting 20 batches of random bytes at steps {bad[0]}-{bad[1] - 1}; the agent's default policy "
                "(the PaLM recipe: roll back 100 steps, skip 200 batches) should catch it",
                file=out,
                flush=True,
            )
        tc = TrainConfig(steps=steps, lr=lr, seed=seed, bad_batches=bad)
        losses = train(tc, sentinel_config=config, on_step=on_step)
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # let the last messages land before reading the agent's counters
        result = DemoResult(
            steps=len(losses),
            final_loss=losses[-1],
            sent=counters.get("sent", 0),
            dropped=counters.get("dropped", 0),
            agent=_agent_counts(agent),
            seconds=seconds,
            actions=_actions(agent.events_path),
        )
        agent.stop()  # the agent's files are complete and closed before the report reads them
        target = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="sentinel-demo-report-"))
        result.report = _report(Path(workdir.name) / "agent", target, out)
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
    if result.actions:
        print("\nagent actions (events.jsonl)", file=out)
        for line in result.actions:
            print(f"  {line}", file=out)
    if result.report is not None:
        print(f"\nrun report: {result.report}", file=out)
        print(
            f"  (again from the agent's files: sentinel-agent report {result.report.parent / 'agent-state'})", file=out
        )
    return result
