"""Run reports: ``sentinel-agent report RUN_DIR|FILES --out report.html``.

After a run (or during it), from disk alone: the agent's ``events.jsonl`` says what it
decided and why, its recordings ``stats-<run>.jsonl`` hold the statistics and the risk it
computed (docs/report.md lists what each panel reads).  The result is one self-contained
HTML page, figures embedded as PNG, plus the same PNGs beside it for slides and tickets; each
trend detection of the event log also gets a panel of the curve it was fitted on
(agent/report/forecasts.py).
Panels whose statistics are missing are left out with a note; bad lines are left out and
listed; only an unreadable path, an unwritable output or a missing matplotlib is an error.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.report import forecasts, plots
from agent.report.load import ReportInput, RunData, load
from agent.report.marks import Marks, marks_from_events
from agent.report.page import Panel, page
from agent.report.plots import MatplotlibMissing

__all__ = ["MatplotlibMissing", "ReportError", "ReportResult", "build_report", "load"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ReportError(RuntimeError):
    """The report cannot be made: an input path is missing or the output cannot be written."""


@dataclass
class ReportResult:
    html: Path
    images: list[Path] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    panels_left_out: list[str] = field(default_factory=list)


PANELS = (
    (
        "overview",
        "Loss, gradient norm and learning rate",
        "Dark line: the trajectory the run kept; grey: steps a rollback abandoned (red band, with the batches "
        "skipped). Triangles along the top: detections (filled: acted on; hollow: held back by the policy's "
        "limits). Vertical lines: the agent's actions at the step whose statistics triggered them.",
    ),
    (
        "detections",
        "Detections by detector",
        "Each detection the policy decided on (events.jsonl), by detector; diamonds are critical, circles "
        "warnings; the colour is the action taken, hollow grey when the policy's limits held it back.",
    ),
    (
        "risk",
        "Spike risk and ETAs",
        "sentinel_spike_risk as the agent computed it after each message (docs/policy.md), and each trend "
        "predictor's smallest ETA in steps until its statistic reaches its limit (lower is closer). A detection's "
        "risk decays over predict.detection_decay_steps; after a rollback it holds until the run passes its step.",
    ),
    (
        "update_ratio",
        "Update ratio per matrix",
        "‖ΔW‖/‖W‖ per weight matrix and step (WeSaR's spike precursor); biases and norm gains are left out as "
        "the update_ratio predictor leaves them out. After a rollback the columns show the steps the run kept.",
    ),
    (
        "out_rms",
        "Linear-output RMS per module, relative to its start",
        "RMS of each probed module's output over the median of its first records: red above 1 (growth), blue "
        "below; Rybakov et al. saw > 2× growth before divergence.",
    ),
    (
        "attn_logit_max",
        "Max attention logit per attention module",
        "Largest pre-softmax attention logit per module and step; Wortsman et al. §3.1.1: runs past 1e4 diverged.",
    ),
    (
        "adam_eps",
        "Adam ε per tensor",
        "The ε in force per tensor: its param group's, or what the ε-tuner set (Wortsman et al. §3.4: ε must "
        "stay below the gradient RMS); tensors with the same ε share a line.",
    ),
    (
        "wesar_gate",
        "WeSaR gates",
        "The gate α of each reparameterised matrix (W̄ = α·W, Nishida et al.); tensors without a gate are left out.",
    ),
)


def _figure(key: str, rd: RunData, marks: Marks):
    if key == "overview":
        return plots.overview(rd, marks)
    if key == "detections":
        return plots.detections(rd, marks)
    if key == "risk":
        return plots.risk(rd, marks)
    if key == "update_ratio":
        return plots.heatmap(
            rd, "update_ratio", title=f"Run {rd.run}: update ratio ‖ΔW‖/‖W‖ per matrix (log colour scale)", marks=marks,
            colorbar="‖ΔW‖/‖W‖", exclude=plots.UPDATE_RATIO_EXCLUDE,
            left_out_what="biases and norm gains",
        )  # fmt: skip
    if key == "out_rms":
        return plots.heatmap(
            rd, "out_rms", title=f"Run {rd.run}: linear-output RMS ÷ its median over the first records (log colour scale)", marks=marks,
            colorbar="RMS ÷ early median (×)", relative=True,
        )  # fmt: skip
    if key == "attn_logit_max":
        return plots.heatmap(
            rd, "attn_logit_max", title=f"Run {rd.run}: max attention logit per module (pre-softmax, log colour scale)", marks=marks,
            colorbar="max attention logit",
        )  # fmt: skip
    if key == "adam_eps":
        return plots.transform_lines(
            rd, "adam_eps", title=f"Run {rd.run}: Adam ε in force per tensor", ylabel="Adam ε (log scale)",
            marks=marks,
        )  # fmt: skip
    if key == "wesar_gate":
        return plots.transform_lines(
            rd, "wesar_gate", title=f"Run {rd.run}: WeSaR gate α per matrix", ylabel="gate α (W̄ = α·W)",
            drop_constant=1.0, marks=marks,
        )  # fmt: skip
    raise KeyError(key)


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text)[:60].strip("._") or "run"


def build_report(
    paths: Sequence[str | Path], out: str | Path, *, run: str | None = None, title: str | None = None
) -> ReportResult:
    """Read ``paths`` (state directories, events files, recordings), write ``out`` and its PNGs.

    Raises ReportError (missing input, unwritable output) or MatplotlibMissing.
    """
    plots._mpl()  # fail before reading anything if matplotlib is missing
    out = Path(out)
    try:
        data: ReportInput = load(paths, run=run)
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from exc
    if run is not None and run not in data.runs:
        data.note(f"run {run!r} not found in the inputs")
    result = ReportResult(out, runs=sorted(data.runs), notes=data.notes)
    sections = []
    used: set[str] = set()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for name in sorted(data.runs):
            rd = data.runs[name]
            marks = marks_from_events(rd.events)
            slug = _slug(name)
            while slug in used:
                slug += "_"
            used.add(slug)
            panels = []
            for key, panel_title, caption in PANELS:
                panel = Panel(key, panel_title, caption)
                try:
                    fig, panel.note = _figure(key, rd, marks)
                except MatplotlibMissing:
                    raise
                except Exception as exc:  # a figure that cannot be drawn must not cost the rest of the report
                    fig, panel.note = None, f"could not be drawn ({type(exc).__name__}: {exc})"
                if fig is not None:
                    panel.png = plots.png(fig)
                    target = out.with_name(f"{out.stem}-{slug}-{key}.png")
                    _write(target, panel.png)
                    panel.file = target.name
                    result.images.append(target)
                else:
                    result.panels_left_out.append(f"{name}/{key}: {panel.note}")
                panels.append(panel)
            trends = _forecasts(rd, out, slug, result)
            result.panels_left_out += [f"{name}/forecasts: {n}" for n in trends.notes]
            sections.append((rd, marks, panels, trends))
        text = page(data, sections, title=title or _title(data), generated=time.time())
        _write(out, text.encode())
    except OSError as exc:
        raise ReportError(f"cannot write the report {out}: {exc.strerror or exc}") from exc
    return result


def _forecasts(rd: RunData, out: Path, slug: str, result: ReportResult) -> forecasts.Forecasts:
    """The run's forecast panels (agent/report/forecasts.py), drawn and written beside the page."""
    trends = forecasts.select(rd.events)
    drawn = []
    for p in trends.panels:
        try:
            p.png = plots.png(forecasts.figure(p))
        except MatplotlibMissing:
            raise
        except Exception as exc:  # as for the other panels: a note, and the rest of the report
            trends.notes.append(
                f"{forecasts.describe(p.index, p.record)}: could not be drawn ({type(exc).__name__}: {exc})"
            )
            continue
        target = out.with_name(f"{out.stem}-{slug}-forecast-{p.index}.png")
        _write(target, p.png)
        p.file = target.name
        result.images.append(target)
        drawn.append(p)
    trends.panels = drawn
    return trends


def _title(data: ReportInput) -> str:
    names = sorted(data.runs)
    if not names:
        return "llm-sentinel run report"
    return (
        "llm-sentinel run report: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    )


def _write(path: Path, data: bytes) -> None:
    """Atomic: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
