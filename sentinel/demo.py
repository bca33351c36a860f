"""``sentinel demo``: train the tiny GPT on CPU with a live agent, the way a newcomer first sees it.

Runs ``sentinel audit`` on the demo's model first (and sets the ``stabilise`` switch its fix names),
starts ``sentinel-agent`` as a child process (``sentinel_contract.agent_process``: the agent's command
line and ready file, so the trainer imports nothing of the agent), prints its /metrics address as soon as it
listens, trains ``examples/tiny_gpt.py`` with sentinel attached, shows progress, and ends
with a summary of what went over the wire and what the agent decided, and the run report
(``sentinel-agent report``, docs/report.md) written from the agent's files, with its path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sentinel_contract.agent_process import AgentProcess


class Progress:
    """The progress line, and what it saw: the step times, the rollbacks.

    The speed and the ETA come from the same recent window of step times (the last
    ``WINDOW``), so that under a changing load the two never contradict each other: ETA =
    s/step × steps left.  A step whose boundary rolled the run back prints its own line (the
    loss it had, the step it went back to) instead of showing that loss against the restored step.
    """

    WINDOW = 20

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.interactive = stream.isatty()
        self.times: deque[float] = deque(maxlen=self.WINDOW)
        self.rollbacks: list[tuple[int, int]] = []  # (step the run had reached, step it went back to)
        self.counters: dict[str, int] = {}
        self.skipped = 0
        self.stopped = False
        self._last = time.perf_counter()
        self._step = 0

    def seconds_per_step(self) -> float:
        return sum(self.times) / len(self.times) if self.times else float("nan")

    def __call__(self, sn, loss: float) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        self.counters.update(sn.counters)
        self.skipped, self.stopped = sn.position.skipped, sn.should_stop
        done, reached = sn.step, self._step + 1
        self._step = done
        if done < reached:
            self.rollbacks.append((reached, done))
            self._write(
                f"step {reached}: loss {loss:.4f}; the agent rolled the run back to step {done} "
                f"({sn.position.skipped} batch(es) skipped so far)",
                always=True,
            )
            return
        if not self.interactive and done % max(1, self.total // 10) and done != self.total:
            return
        width = 30
        filled = max(0, min(width, int(width * done / self.total)))
        rate = self.seconds_per_step()
        self._write(
            f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{self.total}  loss {loss:.4f}  "
            f"{_duration(rate)}/step  ETA {rate * max(0, self.total - done):4.0f} s"
        )

    def _write(self, line: str, always: bool = False) -> None:
        if self.interactive:
            end = "\n" if always or self._step >= self.total else ""
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


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
    ending: str = ""
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    skipped: int = 0
    audit: AuditOutcome | None = None


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


def _report(agent_dir: Path, report_dir: Path, out, timeout: float = 300.0) -> Path | None:
    """Keep the agent's files in ``report_dir/agent-state`` and write the report from them.

    The report is the agent's (``sentinel-agent report``, matplotlib): it runs as that command, in its
    own process, so the trainer never imports the agent (docs/architecture.md).
    """
    state = report_dir / "agent-state"
    state.mkdir(parents=True, exist_ok=True)
    for path in sorted(agent_dir.glob("*/*.jsonl")):
        shutil.copy2(path, state / path.name)
    html = report_dir / "report.html"
    cmd = [sys.executable, "-m", "agent", "report", str(state), "--out", str(html), "--title", REPORT_TITLE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"\nrun report not written: {exc}", file=out)
        return None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"sentinel-agent report exited with {done.returncode}"]
        print(f"\nrun report not written: {lines[-1].removeprefix('sentinel-agent: error: ')}", file=out)
        return None
    return html


REPORT_TITLE = "llm-sentinel demo run report"


@dataclass
class AuditOutcome:
    """``sentinel audit`` on the demo's own model, as a newcomer would run it, and what the demo did about it."""

    code: int | None  # None: it did not finish
    result: str
    fixes: list[str]
    settings: dict[str, dict[str, bool]]  # sentinel configuration the demo set from the fixes

    def describe(self) -> str:
        meaning = {0: "ok", 1: "the model factory raised", 2: "usage error", 3: "a check failed"}
        what = "did not finish" if self.code is None else f"exit {self.code} ({meaning.get(self.code, 'unknown')})"
        return f"{what}; {self.result}" if self.result else what

    def applied(self) -> str:
        keys = [f"{section}.{k}: {str(v).lower()}" for section, d in self.settings.items() for k, v in d.items()]
        return ", ".join(keys) if keys else "nothing (no fix the demo can set through sentinel's configuration)"


AUDIT_TARGET = "sentinel.examples.tiny_gpt:model"
_SETTING = re.compile(r"\((stabilise)\.(\w+): true\)")


def audit_demo_model(timeout: float = 180.0) -> AuditOutcome:
    """Run ``sentinel audit`` on the demo's model; on a failed check, take the first fix that is a
    ``stabilise.*`` switch (sentinel applies those at attach, docs/stabilisers.md)."""
    cmd = [sys.executable, "-m", "sentinel.cli", "audit", AUDIT_TARGET, "--no-meta"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return AuditOutcome(None, "", [], {})
    lines = done.stdout.splitlines()
    result = next((ln.strip() for ln in reversed(lines) if ln.startswith("result:")), "")
    if not result and done.stderr.strip():
        result = done.stderr.strip().splitlines()[-1]
    fixes = [ln.strip().removeprefix("fix:").strip() for ln in lines if ln.strip().startswith("fix:")]
    settings: dict[str, dict[str, bool]] = {}
    if done.returncode == 3:
        for fix in fixes:
            m = _SETTING.search(fix)
            if m:
                settings = {m[1]: {m[2]: True}}
                break
    return AuditOutcome(done.returncode, result, fixes, settings)


def _ending(steps: int, total: int, progress: Progress) -> str:
    if steps >= total:
        return f"after {total} steps, as asked"
    if progress.stopped:
        return f"at step {steps} of {total}: the agent sent stop"
    if progress.skipped:
        return (
            f"at step {steps} of {total}: the data ran out ({total} batches were made for {total} steps, "
            f"and {progress.skipped} were skipped by the agent's commands)"
        )
    return f"at step {steps} of {total}: the data ran out"


def run_demo(
    steps: int,
    lr: float,
    metrics_port: int,
    seed: int = 0,
    inject_spike: bool = False,
    out=sys.stdout,
    report_dir: str | Path | None = None,
    audit: bool = True,
) -> DemoResult:
    """Train, summarise, and write the run report to ``report_dir`` (default: a new directory under /tmp)."""
    from sentinel.examples.tiny_gpt import TrainConfig, train

    outcome = audit_demo_model() if audit else None
    if outcome is not None:
        print(f"sentinel audit {AUDIT_TARGET} --no-meta: {outcome.describe()}", file=out, flush=True)
        for fix in outcome.fixes:
            print(f"  fix: {fix}", file=out)
        print(f"  the demo sets: {outcome.applied()}", file=out, flush=True)
    workdir = tempfile.TemporaryDirectory(prefix="sentinel-demo-")
    with workdir, AgentProcess(Path(workdir.name) / "agent", metrics_port=metrics_port) as agent:
        print(f"agent up: metrics at {agent.metrics_url}  (statistics on {agent.stats_endpoint})", file=out, flush=True)
        progress = Progress(steps)
        start = time.perf_counter()
        config = {
            "run": "demo",
            "publish": {"endpoint": agent.stats_endpoint},
            "control": {"endpoint": agent.commands_endpoint},
            **(outcome.settings if outcome is not None else {}),
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
        losses = train(tc, sentinel_config=config, on_step=progress)
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # let the last messages land before reading the agent's counters
        counters = progress.counters
        result = DemoResult(
            steps=progress._step,
            final_loss=losses[-1],
            sent=counters.get("sent", 0),
            dropped=counters.get("dropped", 0),
            agent=_agent_counts(agent),
            seconds=seconds,
            actions=_actions(agent.events_path),
            ending=_ending(progress._step, steps, progress),
            rollbacks=progress.rollbacks,
            skipped=progress.skipped,
            audit=outcome,
        )
        agent.stop()  # the agent's files are complete and closed before the report reads them
        target = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="sentinel-demo-report-"))
        result.report = _report(Path(workdir.name) / "agent", target, out)
    _summary(result, len(losses), out)
    return result


def _summary(result: DemoResult, trained: int, out) -> None:
    decisions = result.agent.get("sentinel_agent_decisions_total", float("nan"))
    rows = [
        ("ended", result.ending),
        (
            "steps trained",
            f"{trained}" + (f" (the step counter ends at {result.steps})" if trained != result.steps else ""),
        ),
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
        ("agent decisions", f"{decisions:.0f}"),
        (
            "rolled back",
            "; ".join(f"from step {a} to step {b}" for a, b in result.rollbacks) + f", {result.skipped} batches skipped"
            if result.rollbacks
            else "nothing",
        ),
    ]
    if result.audit is not None:
        rows += [("audit", result.audit.describe()), ("set from the audit", result.audit.applied())]
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
