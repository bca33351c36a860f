"""The report page: one self-contained HTML file (styles inline, figures as base64 PNG data URLs).

Every piece of text that came from a file (run names, reasons, evidence, layer names) is
HTML-escaped; the page loads nothing from the network and opens offline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

from agent.curve import eta_of
from agent.policy import describe_actions
from agent.report.forecasts import ForecastPanel, Forecasts
from agent.report.load import ReportInput, RunData
from agent.report.marks import Marks

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1d2733;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin-top:24px}.meta{color:#57606a;font-size:13px}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e3e8ee}
figcaption{font-size:13px;color:#57606a;margin-top:4px}
.missing{background:#f6f8fa;border-left:4px solid #afb8c1;padding:8px 12px;font-size:13px;color:#57606a}
.notes{background:#fff8c5;border-left:4px solid #d4a72c;padding:8px 12px;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;width:100%}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa}table.summary{width:auto}table.summary th{width:220px}
tr.decision td{background:#fff5f5}tr.suppressed td{background:#f6f8fa;color:#57606a}tr.ack td{background:#f2fbf4}
tr.rewind td{background:#fff8e6}td.num{text-align:right;white-space:nowrap}td.when{white-space:nowrap}
.forecasts{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:4px 18px}
.forecasts figure{margin:8px 0}:target{outline:2px solid #d4a72c}
.evidence{color:#57606a;font-size:11.5px;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-word}
"""


def note_html(text: object) -> str:
    """A note as HTML: escaped, with `backticked` names set as code rather than shown raw."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def when(t: object) -> str:
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        return ""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    except (OverflowError, OSError, ValueError):
        return ""


def _num(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _evidence(evidence: object) -> str:
    if not isinstance(evidence, dict):
        return ""
    return ", ".join(f"{k}={_num(v)}" for k, v in evidence.items() if not isinstance(v, (dict, list)))[:600]


def describe(e: dict) -> tuple[str, str, str]:
    """(what happened, detection, evidence line) of one event record."""
    kind = e.get("type")
    detection = ""
    if e.get("detector"):
        detection = f"{e.get('detector')}/{e.get('severity')}" + (f" {e['layer']}" if e.get("layer") else "")
    if kind == "decision":
        cmds = [(c.get("action"), c.get("args") or {}) for c in e.get("commands") or [] if isinstance(c, dict)]
        what = describe_actions(cmds) if cmds else str(e.get("action"))
        return what, detection, str(e.get("reason", ""))
    if kind == "suppressed":
        return f"held back: {e.get('action')} ({e.get('why')})", detection, str(e.get("reason", ""))
    if kind == "ack":
        return f"trainer: {e.get('status')}", "", f"{e.get('detail', '')} (command {e.get('id')})"
    if kind == "sent":
        return f"sent {e.get('action')} (attempt {e.get('attempt')})", "", f"command {e.get('id')}"
    if kind == "rewind":
        what = f"went back from step {e.get('from_step')} to {e.get('to_step')} (timeline {e.get('epoch')})"
        return what, "", f"trained steps = step + {e.get('offset')}"
    if kind == "undeliverable":
        return f"undeliverable: {e.get('action')}", "", f"{e.get('why', '')} (command {e.get('id')})"
    if kind == "expired":
        return f"expired unacknowledged: {e.get('action')}", "", f"command {e.get('id')}"
    if kind == "agent_start":
        return f"agent started (version {e.get('version')})", "", f"pid {e.get('pid')}"
    rest = {k: v for k, v in e.items() if k not in ("v", "type", "time", "run")}
    return str(kind), "", json.dumps(rest, ensure_ascii=False)[:600]


def events_table(events: list[dict], *, anchor: str | None = None, charts: frozenset[int] = frozenset()) -> str:
    """One row per record; with ``anchor``, row i's number cell is ``{anchor}-ev-{i}`` and the rows in
    ``charts`` link to their forecast panel ``{anchor}-fc-{i}``."""
    if not events:
        return '<p class="missing">No events recorded for this run.</p>'
    rows = []
    for i, e in enumerate(events, 1):
        what, detection, line = describe(e)
        kind = str(e.get("type"))
        action = e.get("action") if kind in ("decision", "suppressed") else ""
        extra = _evidence(e.get("evidence")) if kind in ("decision", "suppressed") else ""
        step = e.get("step", "")
        num = f'<td class="num" id="{anchor}-ev-{i}">' if anchor else '<td class="num">'
        link = f' <a class="forecast-link" href="#{anchor}-fc-{i}">chart</a>' if anchor and i in charts else ""
        rows.append(
            f'<tr class="event {esc(kind)}" data-type="{esc(kind)}" data-action="{esc(action or "")}">'
            f'{num}{i}</td><td class="when">{esc(when(e.get("time")))}</td><td>{esc(kind)}</td>'
            f'<td class="num">{esc(step if step is not None else "")}</td><td>{esc(what)}</td><td>{esc(detection)}{link}</td>'
            f"<td>{esc(line)}" + (f'<div class="evidence">{esc(extra)}</div>' if extra else "") + "</td></tr>"
        )
    head = "<tr><th>#</th><th>time</th><th>type</th><th>step</th><th>what</th><th>detection</th><th>evidence</th></tr>"
    return f'<table class="events">{head}{"".join(rows)}</table>'


@dataclass
class Panel:
    key: str
    title: str
    caption: str
    png: bytes | None = None
    file: str | None = None
    note: str | None = None

    def html(self) -> str:
        if self.png is None:
            return f'<p class="missing" data-panel="{esc(self.key)}"><b>{esc(self.title)}</b>: left out, {note_html(self.note)}.</p>'
        data = base64.b64encode(self.png).decode()
        return (
            f'<figure data-panel="{esc(self.key)}"><img alt="{esc(self.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(self.title)}.</b> {esc(self.caption)}"
            + (f" (also <code>{esc(self.file)}</code>)" if self.file else "")
            + "</figcaption></figure>"
        )


FORECASTS_CAPTION = (
    "Each trend detection of the event log with the curve it was fitted on: the points (the statistic in its "
    "own units), the fitted line to the ETA (clipped at three times the points' span past the last point, the ETA then "
    "named at the edge), the limit it heads to (dashed red; crossing it is divergence; for adam_eps the value "
    "falls towards ε), the detection's step (dotted) and the ETA (dash-dotted). Without an ETA (a level warning, "
    "a jump of the update ratios) the points and the limit only."
)


def forecast_figure(p: ForecastPanel, anchor: str) -> str:
    rec = p.record
    data = base64.b64encode(p.png or b"").decode()
    eta = eta_of(rec.get("eta_steps"))
    eta_text = "no ETA" if eta is None else f"ETA {eta:.0f} steps"
    held = f", held back ({rec.get('why')})" if rec.get("type") == "suppressed" else ""
    return (
        f'<figure class="forecast" id="{anchor}-fc-{p.index}" data-forecast="{esc(rec.get("detector"))}">'
        f'<img alt="{esc(p.title)}" src="data:image/png;base64,{data}"><figcaption><b>{esc(p.title)}</b> at step '
        f"{esc(rec.get('step'))}, {esc(eta_text)}{esc(held)}: {esc(rec.get('reason', ''))} "
        f'(<a href="#{anchor}-ev-{p.index}">event #{p.index}</a>'
        + (f"; also <code>{esc(p.file)}</code>" if p.file else "")
        + ")</figcaption></figure>"
    )


def forecasts_section(trends: Forecasts, anchor: str) -> str:
    if trends.empty:
        return ""
    parts = [f'<h3 id="{anchor}-forecasts">Forecasts ({len(trends.panels)})</h3>']
    if trends.panels:
        parts.append(f'<p class="meta">{esc(FORECASTS_CAPTION)}</p><div class="forecasts">')
        parts += [forecast_figure(p, anchor) for p in trends.panels]
        parts.append("</div>")
    if trends.notes:
        items = "".join(f"<li>{note_html(n)}</li>" for n in trends.notes)
        parts.append(f'<div class="missing" data-panel="forecasts"><ul>{items}</ul></div>')
    return "".join(parts)


def summary_table(rd: RunData, marks: Marks) -> str:
    rows: list[tuple[str, str]] = []
    if rd.steps:
        rows.append(("steps recorded", f"{min(rd.steps)} – {max(rd.steps)} ({len(rd.steps)} messages with scalars)"))
    if rd.messages:
        ranks = ", ".join(str(r) for r in sorted(rd.ranks))
        rows.append(("statistics messages", f"{rd.messages} from rank {rd.rank} (ranks recorded: {ranks})"))
    timelines = (rd.epochs[-1] + 1) if rd.epochs else 1
    if timelines > 1 or marks.spans:
        rows.append(("timelines", f"{timelines} (the run went back {len(marks.spans) or timelines - 1} time(s))"))
    if marks.detections:
        sev = Counter(d.severity for d in marks.detections)
        rows.append(("detections", ", ".join(f"{n} {k}" for k, n in sorted(sev.items()))))
    acts = Counter(a.action for a in marks.actions)
    rows.append(("actions", ", ".join(f"{n} × {k}" for k, n in sorted(acts.items())) or "none"))
    held = sum(1 for d in marks.detections if d.held_back)
    if held:
        rows.append(("actions held back by the policy's limits", str(held)))
    if rd.risk:
        top = max(rd.risk, key=lambda r: r["score"])
        rows.append(("highest spike risk", f"{top['score']:.2f} at step {top['step']}: {top.get('explanation') or ''}"))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def page(
    data: ReportInput, sections: list[tuple[RunData, Marks, list[Panel], Forecasts]], *, title: str, generated: float
) -> str:
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>",
        f'<p class="meta">Generated {esc(when(generated))} by <code>sentinel-agent report</code> from '
        f"{len(data.events_files)} event log(s) and {len(data.recording_files)} recording file(s): "
        + esc(", ".join(str(p) for p in [*data.events_files, *data.recording_files]) or "none")
        + ".</p>",
    ]
    if not data.runs:
        parts.append(
            '<p class="missing">No runs found: no statistics recordings and no event records naming a run.</p>'
        )
    if data.notes:
        items = "".join(f"<li>{note_html(n)}</li>" for n in data.notes)
        parts.append(
            f'<div class="notes"><b>Read with notes</b> ({data.skipped_lines} line(s) left out):<ul>{items}</ul></div>'
        )
    if len(sections) > 1:
        links = "".join(f'<li><a href="#run-{i}">{esc(rd.run)}</a></li>' for i, (rd, *_) in enumerate(sections))
        parts.append(f"<ul>{links}</ul>")
    for i, (rd, marks, panels, trends) in enumerate(sections):
        anchor = f"run-{i}"
        parts.append(f'<section id="{anchor}" data-run="{esc(rd.run)}"><h2>Run {esc(rd.run)}</h2>')
        parts.append(summary_table(rd, marks))
        parts += [p.html() for p in panels]
        parts.append(forecasts_section(trends, anchor))
        parts.append(f"<h3>Events ({len(rd.events)})</h3>")
        parts.append(events_table(rd.events, anchor=anchor, charts=frozenset(p.index for p in trends.panels)))
        parts.append("</section>")
    if data.global_events:
        parts.append(f"<h2>Agent events ({len(data.global_events)})</h2>")
        parts.append(events_table(data.global_events))
    parts.append("</body></html>\n")
    return "\n".join(parts)
