"""The agent's live status page: what each run is doing now, how risky it looks, what was decided.

``StatusBoard.status()`` builds the ``/api/status`` document (schema in docs/status-page.md)
from the agent's bounded state: the latest scalars and the loss and gradient-norm rings of
``agent.history``, the supervisor's risk score with its one-line explanation
(``agent.predict.SeriesPredictor.risk``), and the tail of the event log.  The risk is not
kept by the history, so ``RiskTrail`` keeps a small ring of it per run, sampled from the
supervisor at most every ``RISK_SAMPLE_SECONDS`` on the receiver thread (so the cost per
message is one clock read) and at every status request.

``render_page`` turns that document into server-rendered HTML with inline SVG charts; the
page's small script fetches ``/api/status`` every two seconds and redraws the same elements
with DOM calls only (``textContent``, ``createElementNS``), so nothing from the network is
ever parsed as markup; the server side escapes everything with ``html.escape``.  The page's
links and its fetch are relative (``api/status``, ``metrics``), so the page also works behind a
reverse proxy that serves the agent under a sub-path such as ``/sentinel/``.  Panels whose
data is missing are left out with a note saying why.
"""

from __future__ import annotations

import html
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agent import __version__
from agent.config import AgentConfig
from agent.events import EventLog, plain
from agent.state import AgentState
from agent.supervisor import RunStatus, Supervisor, SupervisorSnapshot

STATUS_VERSION = 1
CHART_POINTS = 240
MAX_CHART_RUNS = 16
RECENT_EVENTS = 20
RISK_SAMPLE_SECONDS = 0.25
POLL_MILLISECONDS = 2000
SPARSE_POINTS = 40
ETA_LABEL = "steps until a trend reaches its threshold: "
CHARTS = (("loss", "loss"), ("grad_norm", "grad norm"), ("risk", "risk"))
SHOWN_SCALARS = (("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "lr"), ("step_duration_seconds", "s/step"))


class RiskTrail:
    """Recent (step, risk score) points per run, at most ``capacity`` each; thread-safe."""

    def __init__(self, supervisor: Supervisor, capacity: int, *, interval: float = RISK_SAMPLE_SECONDS):
        self.supervisor = supervisor
        self.capacity = capacity
        self.interval = interval
        self._rings: dict[str, deque[tuple[int, float]]] = {}
        self._last_sample = -math.inf
        self._lock = threading.Lock()

    def observe(self) -> None:
        """Sample the supervisor if ``interval`` passed since the last sample (receiver thread)."""
        now = time.monotonic()
        if now - self._last_sample < self.interval:
            return
        self._last_sample = now
        self.record(self.supervisor.snapshot())

    def record(self, snap: SupervisorSnapshot) -> None:
        with self._lock:
            for r in snap.runs:
                ring = self._rings.get(r.run)
                if ring is None:
                    ring = self._rings[r.run] = deque(maxlen=self.capacity)
                while ring and ring[-1][0] > r.step:  # the trainer went back: forget the abandoned steps
                    ring.pop()
                if ring and ring[-1][0] == r.step:
                    ring[-1] = (r.step, r.risk.score)
                elif r.step >= 0:
                    ring.append((r.step, r.risk.score))
            for run in set(self._rings) - {r.run for r in snap.runs}:
                del self._rings[run]

    def points(self, run: str) -> tuple[list[int], list[float]]:
        with self._lock:
            ring = list(self._rings.get(run, ()))
        return [s for s, _ in ring], [v for _, v in ring]


class StatusBoard:
    """Builds the ``/api/status`` document; every call copies under the owners' locks, one at a time."""

    def __init__(
        self,
        state: AgentState,
        supervisor: Supervisor,
        events: EventLog,
        config: AgentConfig,
        *,
        stats_endpoint: Callable[[], str | None] | None = None,
    ):
        self.state, self.supervisor, self.events, self.config = state, supervisor, events, config
        self.stats_endpoint = stats_endpoint
        self.risk = RiskTrail(supervisor, config.history.steps)
        self.started_at = time.time()
        self._seed: list[dict] = []

    def observe(self) -> None:
        """Called by the receiver thread after each accepted message: cheap unless a sample is due."""
        self.risk.observe()

    def seed_events(self, records: Sequence[dict]) -> None:
        """Events written before this process started (read back from the event log at start)."""
        self._seed = list(records[-RECENT_EVENTS:])

    def status(self) -> dict:
        """The ``/api/status`` document: plain JSON types, non-finite numbers as strings."""
        now = time.time()
        with self.state.lock:
            counters = (self.state.received_messages, dict(self.state.rejected_messages), self.state.decisions)
            runs = _collect_series(self.state)
        sup = self.supervisor.snapshot()
        self.risk.record(sup)
        risks = {r.run: r for r in sup.runs}
        predict = self.config.predict
        out_runs = [self._run(entry, risks.get(entry["run"]), now, predict.enabled) for entry in runs]
        notes = []
        if len(runs) > MAX_CHART_RUNS:
            notes.append(f"charts are drawn for the {MAX_CHART_RUNS} most recently updated of {len(runs)} runs")
        if not predict.enabled:
            notes.append("predictions are off (predict.enabled: false): no risk scores")
        received, rejected, decisions = counters
        doc = {
            "version": STATUS_VERSION,
            "time": now,
            "agent": {
                "version": __version__,
                "started_at": self.started_at,
                "stats_endpoint": (self.stats_endpoint() if self.stats_endpoint else None)
                or self.config.stats_endpoint,
                "received_messages": received,
                "rejected_messages": sum(rejected.values()),
                "rejected_by_reason": {k: v for k, v in rejected.items() if v},
                "decisions": decisions,
                "predict_enabled": predict.enabled,
            },
            "runs": out_runs,
            "events": [_event(rec) for rec in reversed(self._recent_events())],
            "notes": notes,
        }
        return plain(doc)

    def _recent_events(self) -> list[dict]:
        own = self.events.records[-RECENT_EVENTS:]  # a slice is taken atomically; appends go on meanwhile
        return (self._seed + own)[-RECENT_EVENTS:]

    def _run(self, entry: dict, sup: RunStatus | None, now: float, predict_enabled: bool) -> dict:
        run = entry["run"]
        notes = []
        risk = None
        if sup is not None:
            risk = {
                "score": sup.risk.score,
                "explanation": sup.risk.explanation,
                "predictor": sup.risk.predictor,
                "layer": sup.risk.layer,
                "etas": dict(sorted(sup.etas.items())),
            }
        elif predict_enabled:
            notes.append("no risk estimate yet (the predictors see only the ranks chosen by predict.ranks)")
        raw = entry.pop("charts")
        charts = None
        if raw is not None:
            charts = {key: _downsample(*raw[key], CHART_POINTS) for key in ("loss", "grad_norm")}
            charts["risk"] = _downsample(*self.risk.points(run), CHART_POINTS)
        else:
            notes.append("charts left out: only the most recently updated runs are charted")
        for key, label in SHOWN_SCALARS[:2]:
            if charts is not None and not charts[key]["steps"]:
                notes.append(f"no {label} reported recently (scalar `{key}`): its chart is left out")
            elif key not in entry["scalars"]:
                notes.append(f"no {label} in the latest message")
        if entry["nonfinite_values"]:
            notes.append(
                f"{entry['nonfinite_values']} non-finite value(s) received (NaN or ±Inf; red rules on the charts)"
            )
        return {
            **entry,
            "age_seconds": max(0.0, now - entry["received_at"]),
            "risk": risk,
            "charts": charts,
            "notes": notes,
        }


def _collect_series(state: AgentState) -> list[dict]:
    """One entry per run, most recently updated first, from its lowest rank; the caller holds the
    state lock, so this only copies (charts are downsampled after the lock is released)."""
    by_run: dict[str, list] = {}
    for s in reversed(list(state.history)):
        by_run.setdefault(s.run, []).append(s)
    out = []
    for i, (run, series) in enumerate(by_run.items()):
        primary = min(series, key=lambda s: s.rank)
        charts = None
        if i < MAX_CHART_RUNS:
            charts = {name: primary.scalar(name) for name in ("loss", "grad_norm")}  # copies
        out.append(
            {
                "run": run,
                "rank": primary.rank,
                "ranks": sorted(s.rank for s in series),
                "step": primary.latest_step if primary.latest_step is not None else -1,
                "received_at": max(s.latest_received_at or 0.0 for s in series),
                "scalars": primary.latest_scalars(),
                "sent": primary.sent,
                "dropped": sum(s.dropped for s in series),
                "nonfinite_values": sum(s.nonfinite_values for s in series),
                "charts": charts,
            }
        )
    return out


def _downsample(steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray, points: int) -> dict:
    """About ``points`` points: per bucket of ``points // 2`` its minimum and maximum (a spike
    survives), its first non-finite value if any, and always the latest point."""
    steps, values = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
    n = len(steps)
    if n > points:
        buckets = max(1, points // 2)
        bucket = np.arange(n) * buckets // n
        keep = [np.array([n - 1])]
        fin = np.flatnonzero(np.isfinite(values))
        if len(fin):
            order = fin[np.lexsort((values[fin], bucket[fin]))]  # by bucket, then by value
            first = np.r_[True, np.diff(bucket[order]) != 0]
            last = np.r_[first[1:], True]
            keep += [order[first], order[last]]
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            keep.append(bad[np.unique(bucket[bad], return_index=True)[1]])
        idx = np.unique(np.concatenate(keep))
        steps, values = steps[idx], values[idx]
    return {"steps": steps.tolist(), "values": values.tolist()}


def _event(rec: dict) -> dict:
    return {
        "time": rec.get("time"),
        "type": rec.get("type"),
        "run": rec.get("run"),
        "step": rec.get("step"),
        "severity": rec.get("severity"),
        "action": rec.get("action"),
        "summary": event_summary(rec),
    }


def event_summary(rec: dict) -> str:
    """One line for a person, from an events.jsonl record (docs/policy.md lists the types)."""
    kind = rec.get("type")
    get = rec.get
    if kind == "decision":
        return str(get("reason") or f"{get('action')} after {get('detector')}")
    if kind == "suppressed":
        return f"held back ({get('why')}): {get('reason')}"
    if kind == "rewind":
        return f"the trainer went back from step {get('from_step')} to {get('to_step')}"
    if kind == "sent":
        return f"sent {get('action')} ({get('id')})"
    if kind == "ack":
        detail = f": {get('detail')}" if get("detail") else ""
        return f"trainer answered {get('status')} at step {get('step')}{detail}"
    if kind == "undeliverable":
        return f"{get('action')} waiting: {get('why')}"
    if kind == "expired":
        return f"{get('action')} ({get('id')}) expired unacknowledged"
    if kind == "agent_start":
        return f"agent {get('version')} started (pid {get('pid')})"
    return str(kind)


# -- rendering -------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A number as the page shows it: four significant digits (the script's ``fmt`` matches)."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    v = float(value)
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    a = abs(v)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e5:
        return f"{float(f'{v:.4g}'):.10g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def fmt_time(t: float | None) -> str:
    return "–" if not isinstance(t, (int, float)) else time.strftime("%H:%M:%S", time.gmtime(t))


def fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def risk_level(score: float) -> str:
    return "high" if score >= 0.7 else "medium" if score >= 0.3 else "low"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def summary_line(doc: dict) -> str:
    a = doc["agent"]
    rejected = f" ({a['rejected_messages']} rejected)" if a["rejected_messages"] else ""
    return (
        f"agent {a['version']} · {len(doc['runs'])} run(s) · {a['received_messages']} messages{rejected}"
        f" · {a['decisions']} decisions"
    )


W, H, LEFT, RIGHT, TOP, BOTTOM = 320, 120, 58, 8, 8, 18


def chart_svg(name: str, steps: Sequence[int], values: Sequence[Any]) -> str:
    """An inline SVG line chart; non-finite values break the line and are marked by a red rule."""
    xs = list(steps)
    finite = [(s, float(v)) for s, v in zip(xs, values) if isinstance(v, (int, float)) and math.isfinite(v)]
    bad = [s for s, v in zip(xs, values) if not (isinstance(v, (int, float)) and math.isfinite(v))]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if name == "risk":
        y0, y1 = 0.0, 1.0
    elif finite:
        y0, y1 = min(v for _, v in finite), max(v for _, v in finite)
        if y0 == y1:
            pad = abs(y0) * 0.05 or 1.0
            y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = 0.0, 1.0

    def px(s: float) -> float:
        return round(LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT), 1)

    def py(v: float) -> float:
        return round(TOP + (y1 - v) / (y1 - y0) * (H - TOP - BOTTOM), 1)

    parts = [
        f'<svg class="chart-{_e(name)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"'
        f' aria-label="{_e(name)} over the last steps">',
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}"/>',
        f'<text class="ylabel" x="{LEFT - 4}" y="{TOP + 9}" text-anchor="end">{_e(fmt(y1))}</text>',
        f'<text class="ylabel" x="{LEFT - 4}" y="{H - BOTTOM}" text-anchor="end">{_e(fmt(y0))}</text>',
        f'<text class="xlabel" x="{LEFT}" y="{H - 4}" text-anchor="start">{_e(min(xs))}</text>',
        f'<text class="xlabel" x="{W - RIGHT}" y="{H - 4}" text-anchor="end">step {_e(max(xs))}</text>',
    ]
    for s in bad:
        parts.append(f'<line class="nonfinite" x1="{px(s)}" x2="{px(s)}" y1="{TOP}" y2="{H - BOTTOM}"/>')
    segment: list[str] = []
    segments = [segment]
    for s, v in zip(xs, values):
        if isinstance(v, (int, float)) and math.isfinite(v):
            segment.append(f"{px(s)},{py(float(v))}")
        elif segment:
            segment = []
            segments.append(segment)
    sparse = len(finite) <= SPARSE_POINTS  # few samples: mark each, so a straight line is not read as data
    for seg in segments:
        if len(seg) > 1:
            parts.append(f'<polyline class="line" points="{" ".join(seg)}"/>')
        for point in seg if sparse or len(seg) == 1 else ():
            x, y = point.split(",")
            parts.append(f'<circle class="dot" cx="{x}" cy="{y}" r="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _run_card(run: dict) -> str:
    risk = run["risk"]
    badge = ""
    if risk is not None:
        level = risk_level(float(risk["score"]))
        badge = f'<span class="risk risk-{level}">risk {_e(fmt(risk["score"]))}</span>'
    facts = [("step", "step", str(run["step"]))]
    for key, label in SHOWN_SCALARS:
        if key in run["scalars"]:
            facts.append((key, label, fmt(run["scalars"][key])))
    facts.append(("age", "last message", fmt_age(float(run["age_seconds"]))))
    ranks = run["ranks"]
    facts.append(("ranks", "ranks", f"{len(ranks)} ({ranks[0]}…{ranks[-1]})" if len(ranks) > 1 else str(ranks[0])))
    if run["dropped"]:
        facts.append(("dropped", "dropped", str(run["dropped"])))
    dl = "".join(
        f'<div><dt>{_e(label)}</dt><dd class="{_e(key)}">{_e(value)}</dd></div>' for key, label, value in facts
    )
    explanation = ""
    if risk is not None:
        etas = ", ".join(f"{k} ≈ {fmt(v)}" for k, v in risk["etas"].items())
        explanation = f'<p class="explanation">{_e(risk["explanation"])}</p>'
        if etas:
            explanation += f'<p class="etas">{ETA_LABEL}{_e(etas)}</p>'
    charts = ""
    if run["charts"] is not None:
        figures = []
        for key, label in CHARTS:
            c = run["charts"][key]
            if c["steps"]:
                latest = fmt(c["values"][-1])
                figures.append(
                    f'<figure class="chart" data-chart="{key}"><figcaption>{_e(label)}'
                    f' <span class="latest">{_e(latest)}</span></figcaption>{chart_svg(key, c["steps"], c["values"])}'
                    "</figure>"
                )
        charts = f'<div class="charts">{"".join(figures)}</div>'
    notes = "".join(f'<li class="note">{_e(n)}</li>' for n in run["notes"])
    return (
        f'<article class="run" data-run="{_e(run["run"])}"><h2><span class="name">{_e(run["run"])}</span> {badge}</h2>'
        f'<dl class="facts">{dl}</dl>{explanation}{charts}'
        f"{f'<ul class=notes>{notes}</ul>' if notes else ''}</article>"
    )


def _events_rows(events: list[dict]) -> str:
    if not events:
        return '<tr><td colspan="4" class="note">no events yet</td></tr>'
    rows = []
    for ev in events:
        sev = ev.get("severity")
        cls = f' class="sev-{_e(sev)}"' if sev in ("warning", "critical") else ""
        rows.append(
            f"<tr{cls}><td>{_e(fmt_time(ev.get('time')))}</td><td>{_e(ev.get('run') or '')}</td>"
            f"<td>{_e(ev.get('type'))}</td><td>{_e(ev.get('summary'))}</td></tr>"
        )
    return "".join(rows)


def _runs_html(doc: dict) -> str:
    if not doc["runs"]:
        return (
            '<p class="empty">No statistics received yet. Trainers publish to '
            f"<code>{_e(doc['agent']['stats_endpoint'])}</code> (docs/protocol.md).</p>"
        )
    return "".join(_run_card(r) for r in doc["runs"])


def render_page(doc: dict, nonce: str) -> str:
    """The whole page for ``doc`` (a ``StatusBoard.status()`` document); ``nonce`` unlocks its script."""
    notes = "".join(f"<li>{_e(n)}</li>" for n in doc["notes"])
    n = _e(nonce)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sentinel agent</title><style nonce="{n}">{STYLE}</style></head>
<body data-rendered="server">
<header><h1>Sentinel agent</h1>
<p id="summary">{_e(summary_line(doc))}</p>
<p id="updated" class="updated">updated {_e(fmt_time(doc["time"]))} UTC</p>
<nav><a href="api/status">/api/status</a> · <a href="metrics">/metrics</a></nav></header>
<ul id="notes" class="notes">{notes}</ul>
<main id="runs">{_runs_html(doc)}</main>
<section><h2>Recent events</h2>
<table id="events"><thead><tr><th>time (UTC)</th><th>run</th><th>type</th><th>what</th></tr></thead>
<tbody>{_events_rows(doc["events"])}</tbody></table></section>
<script nonce="{n}">{SCRIPT}</script>
</body></html>
"""


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:12px 20px;max-width:1100px;
color:#1d2330;background:#f6f7f9}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 18px;border-bottom:1px solid #d8dce3;margin-bottom:10px}
h1{font-size:20px;margin:6px 0}h2{font-size:16px;margin:0 0 8px}
#summary,.updated,nav{margin:4px 0;color:#4a5263}.updated.stale{color:#b3261e;font-weight:600}
a{color:#1a5fb4}
.run{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:12px 14px;margin:0 0 12px}
.run h2{display:flex;align-items:center;gap:10px;word-break:break-all}
.risk{font-size:13px;padding:2px 8px;border-radius:10px;font-weight:600;white-space:nowrap}
.risk-low{background:#e3f4e6;color:#1e6b2f}.risk-medium{background:#fff1cc;color:#7a5200}
.risk-high{background:#fbdcdc;color:#a1141a}
.facts{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0 0 6px}.facts div{min-width:70px}
dt{font-size:12px;color:#5d6678}dd{margin:0;font-size:17px;font-variant-numeric:tabular-nums;font-weight:600}
.explanation{margin:6px 0;padding:6px 8px;background:#f1f3f7;border-left:3px solid #8a94a8}
.etas{margin:4px 0;color:#4a5263}
.charts{display:flex;flex-wrap:wrap;gap:10px 16px}.chart{margin:0}
figcaption{font-size:12px;color:#5d6678}.latest{color:#1d2330;font-weight:600}
svg .plot{fill:#fafbfc;stroke:#d8dce3}svg .line{fill:none;stroke:#1a5fb4;stroke-width:1.6}
svg.chart-risk .line{stroke:#c0392b}svg .dot{fill:#1a5fb4}svg.chart-risk .dot{fill:#c0392b}svg .nonfinite{stroke:#d0021b;stroke-width:1.5}
svg text{font-size:10px;fill:#5d6678;font-variant-numeric:tabular-nums}
.notes{margin:4px 0;padding-left:18px;color:#6b5900;font-size:13px}.empty{color:#4a5263}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dce3}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-size:12px;color:#5d6678;font-weight:600}td:nth-child(2){word-break:break-all}
tr.sev-warning td{background:#fffaeb}tr.sev-critical td{background:#fdecec}
"""

_SCRIPT_HEAD = f"""
"use strict";
(function () {{
  const W = {W}, H = {H}, LEFT = {LEFT}, RIGHT = {RIGHT}, TOP = {TOP}, BOTTOM = {BOTTOM}, POLL = {POLL_MILLISECONDS};
  const SPARSE = {SPARSE_POINTS}, ETA_LABEL = {json.dumps(ETA_LABEL)};
"""

_SCRIPT_BODY = """
  const CHARTS = [["loss", "loss"], ["grad_norm", "grad norm"], ["risk", "risk"]];
  const SHOWN = [["loss", "loss"], ["grad_norm", "grad norm"], ["lr", "lr"], ["step_duration_seconds", "s/step"]];
  const SVG = "http://www.w3.org/2000/svg";
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children || []) e.append(c);
    return e;
  }
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\\u2013";
    if (typeof v !== "number") return String(v);
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e-3 && a < 1e5) return String(parseFloat(v.toPrecision(4)));
    const [m, e] = v.toExponential(3).split("e");
    return m.replace(/\\.?0+$/, "") + "e" + parseInt(e, 10);
  }
  function fmtTime(t) { return typeof t === "number" ? new Date(t * 1000).toISOString().slice(11, 19) : "\\u2013"; }
  function fmtAge(s) {
    if (s < 120) return Math.round(s) + " s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function level(score) { return score >= 0.7 ? "high" : score >= 0.3 ? "medium" : "low"; }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function chart(name, steps, values) {
    const fin = values.filter(isNum);
    let x0 = Math.min(...steps), x1 = Math.max(...steps);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    let y0 = 0, y1 = 1;
    if (name !== "risk" && fin.length) {
      y0 = Math.min(...fin); y1 = Math.max(...fin);
      if (y0 === y1) { const pad = Math.abs(y0) * 0.05 || 1; y0 -= pad; y1 += pad; }
    }
    const px = s => Math.round((LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT)) * 10) / 10;
    const py = v => Math.round((TOP + (y1 - v) / (y1 - y0) * (H - TOP - BOTTOM)) * 10) / 10;
    const svg = sv("svg", {class: "chart-" + name, viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                           "aria-label": name + " over the last steps"});
    svg.append(sv("rect", {class: "plot", x: LEFT, y: TOP, width: W - LEFT - RIGHT, height: H - TOP - BOTTOM}));
    svg.append(sv("text", {class: "ylabel", x: LEFT - 4, y: TOP + 9, "text-anchor": "end"}, fmt(y1)));
    svg.append(sv("text", {class: "ylabel", x: LEFT - 4, y: H - BOTTOM, "text-anchor": "end"}, fmt(y0)));
    svg.append(sv("text", {class: "xlabel", x: LEFT, y: H - 4, "text-anchor": "start"}, String(Math.min(...steps))));
    svg.append(sv("text", {class: "xlabel", x: W - RIGHT, y: H - 4, "text-anchor": "end"},
                  "step " + Math.max(...steps)));
    const segs = [[]];
    steps.forEach((s, i) => {
      const v = values[i];
      if (isNum(v)) segs[segs.length - 1].push(px(s) + "," + py(v));
      else {
        svg.append(sv("line", {class: "nonfinite", x1: px(s), x2: px(s), y1: TOP, y2: H - BOTTOM}));
        if (segs[segs.length - 1].length) segs.push([]);
      }
    });
    const sparse = fin.length <= SPARSE;
    for (const seg of segs) {
      if (seg.length > 1) svg.append(sv("polyline", {class: "line", points: seg.join(" ")}));
      for (const point of (sparse || seg.length === 1) ? seg : []) {
        const [x, y] = point.split(",");
        svg.append(sv("circle", {class: "dot", cx: x, cy: y, r: 2}));
      }
    }
    return svg;
  }
  function card(run) {
    const name = el("span", {class: "name"}, [run.run]);
    const h = el("h2", {}, [name, " "]);
    if (run.risk) {
      h.append(el("span", {class: "risk risk-" + level(run.risk.score)}, ["risk " + fmt(run.risk.score)]));
    }
    const facts = [["step", "step", String(run.step)]];
    for (const [k, label] of SHOWN) if (k in run.scalars) facts.push([k, label, fmt(run.scalars[k])]);
    facts.push(["age", "last message", fmtAge(run.age_seconds)]);
    const r = run.ranks;
    facts.push(["ranks", "ranks", r.length > 1 ? `${r.length} (${r[0]}\\u2026${r[r.length - 1]})` : String(r[0])]);
    if (run.dropped) facts.push(["dropped", "dropped", String(run.dropped)]);
    const dl = el("dl", {class: "facts"},
                  facts.map(([k, label, v]) => el("div", {}, [el("dt", {}, [label]), el("dd", {class: k}, [v])])));
    const art = el("article", {class: "run", "data-run": run.run}, [h, dl]);
    if (run.risk) {
      art.append(el("p", {class: "explanation"}, [run.risk.explanation]));
      const etas = Object.entries(run.risk.etas).map(([k, v]) => `${k} \u2248 ${fmt(v)}`).join(", ");
      if (etas) art.append(el("p", {class: "etas"}, [ETA_LABEL + etas]));
    }
    if (run.charts) {
      const figs = [];
      for (const [k, label] of CHARTS) {
        const c = run.charts[k];
        if (!c.steps.length) continue;
        const cap = el("figcaption", {}, [label + " ", el("span", {class: "latest"}, [fmt(c.values[c.values.length - 1])])]);
        figs.push(el("figure", {class: "chart", "data-chart": k}, [cap, chart(k, c.steps, c.values)]));
      }
      art.append(el("div", {class: "charts"}, figs));
    }
    if (run.notes.length) art.append(el("ul", {class: "notes"}, run.notes.map(n => el("li", {class: "note"}, [n]))));
    return art;
  }
  function eventRow(ev) {
    const sev = ev.severity === "warning" || ev.severity === "critical" ? {class: "sev-" + ev.severity} : {};
    return el("tr", sev, [fmtTime(ev.time), ev.run || "", String(ev.type), String(ev.summary)]
      .map(t => el("td", {}, [t])));
  }
  function render(doc) {
    const a = doc.agent;
    const rej = a.rejected_messages ? ` (${a.rejected_messages} rejected)` : "";
    document.getElementById("summary").textContent =
      `agent ${a.version} \\u00b7 ${doc.runs.length} run(s) \\u00b7 ${a.received_messages} messages${rej}` +
      ` \\u00b7 ${a.decisions} decisions`;
    const up = document.getElementById("updated");
    up.textContent = "updated " + fmtTime(doc.time) + " UTC";
    up.classList.remove("stale");
    document.getElementById("notes").replaceChildren(...doc.notes.map(n => el("li", {}, [n])));
    const runs = document.getElementById("runs");
    if (doc.runs.length) runs.replaceChildren(...doc.runs.map(card));
    else {
      runs.replaceChildren(el("p", {class: "empty"}, ["No statistics received yet. Trainers publish to ",
        el("code", {}, [String(a.stats_endpoint)]), " (docs/protocol.md)."]));
    }
    const rows = doc.events.length ? doc.events.map(eventRow)
      : [el("tr", {}, [el("td", {colspan: "4", class: "note"}, ["no events yet"])])];
    document.querySelector("#events tbody").replaceChildren(...rows);
    document.body.dataset.rendered = "api";
  }
  let failedSince = null;
  async function poll() {
    try {
      const response = await fetch("api/status", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
      failedSince = null;
    } catch (err) {
      failedSince = failedSince || Date.now() / 1000;
      const up = document.getElementById("updated");
      up.textContent = "agent unreachable since " + fmtTime(failedSince) + " UTC (" + err.message + ")";
      up.classList.add("stale");
    }
    setTimeout(poll, POLL);
  }
  poll();
})();
"""

SCRIPT = _SCRIPT_HEAD + _SCRIPT_BODY
