"""The status page's HTML, rendered on the server from a ``StatusBoard.status()`` document.

Inline SVG charts (the recent loss, gradient norm and risk; each current forecast with the points
it was fitted on, its line and its limit), every piece of text escaped with ``html.escape``; the inline script
(agent/status_assets.py) then redraws the same elements from ``/api/status``.  The page's links
and its fetch are relative (``api/status``, ``metrics``), so it also works behind a reverse proxy
that serves the agent under a sub-path such as ``/sentinel/``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from typing import Any

from agent.curve import EXTEND, PAD, STRETCH, Curve, check, eta_of, view
from agent.status_assets import STYLE, script

POLL_MILLISECONDS = 2000
SPARSE_POINTS = 40
ETA_LABEL = "steps until a trend reaches its threshold: "
CHARTS = (("loss", "loss"), ("grad_norm", "grad norm"), ("risk", "risk"))
SHOWN_SCALARS = (("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "lr"), ("step_duration_seconds", "step time"))


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


def fmt_duration(seconds: Any) -> str:
    """A step time for a person: "0.628 ms", "41.2 ms", "1.27 s", "52 µs" (the script's ``fmtDuration`` matches)."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return fmt(seconds)
    a = abs(seconds)
    if a == 0 or a >= 1:
        return f"{fmt(seconds)} s"
    if a >= 1e-4:
        return f"{fmt(seconds * 1e3)} ms"
    return f"{fmt(seconds * 1e6)} µs"


def fmt_ranks(ranks: Sequence[int]) -> tuple[str, str]:
    """(label, value) of the ranks seen: ("rank", "0") for one, ("ranks", "4 (0…3)") for several."""
    if len(ranks) == 1:
        return "rank", str(ranks[0])
    return "ranks", f"{len(ranks)} ({ranks[0]}…{ranks[-1]})"


def timelines(steps: Sequence[int]) -> list[bool]:
    """Per point, True when a later point went back to its step or before: the trainer rolled back
    and the point belongs to an abandoned timeline (the script's ``abandonedOf`` matches)."""
    out, later = [False] * len(steps), math.inf
    for i in range(len(steps) - 1, -1, -1):
        out[i] = later <= steps[i]
        later = min(later, steps[i])
    return out


def x_range(charts: dict) -> tuple[int, int] | None:
    """The steps every chart of a run shares, so that loss, grad norm and risk line up."""
    xs = [s for c in charts.values() for s in c["steps"]]
    return (min(xs), max(xs)) if xs else None


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


QUIET_TITLE = "no message for many step times: the run finished, paused or lost its link"
W, H, LEFT, RIGHT, TOP, BOTTOM = 320, 120, 58, 8, 8, 18


def chart_svg(name: str, steps: Sequence[int], values: Sequence[Any], xrange: tuple[int, int] | None = None) -> str:
    """An inline SVG line chart over ``xrange`` (default: its own steps); non-finite values break the
    line and are marked by a red rule; a rollback breaks it too, and the abandoned timeline is drawn
    apart (class ``abandoned``), so the restored steps are never joined to the ones they replaced."""
    xs = list(steps)
    finite = [(s, float(v)) for s, v in zip(xs, values) if isinstance(v, (int, float)) and math.isfinite(v)]
    bad = [s for s, v in zip(xs, values) if not (isinstance(v, (int, float)) and math.isfinite(v))]
    x0, x1 = xrange or (min(xs), max(xs))
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
        f'<text class="xlabel" x="{LEFT}" y="{H - 4}" text-anchor="start">{_e(x0)}</text>',
        f'<text class="xlabel" x="{W - RIGHT}" y="{H - 4}" text-anchor="end">step {_e(x1)}</text>',
    ]
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    for s in bad:
        parts.append(f'<line class="nonfinite" x1="{px(s)}" x2="{px(s)}" y1="{TOP}" y2="{H - BOTTOM}"/>')
    abandoned = timelines(xs)
    segments: list[tuple[bool, list[str]]] = [(False, [])]
    prev: int | None = None
    for s, v, old in zip(xs, values, abandoned):
        fine = isinstance(v, (int, float)) and math.isfinite(v)
        if segments[-1][1] and (not fine or old != segments[-1][0] or (prev is not None and s <= prev)):
            segments.append((old, []))
        elif not segments[-1][1]:
            segments[-1] = (old, [])
        if fine:
            segments[-1][1].append(f"{px(s)},{py(float(v))}")
        prev = s
    sparse = len(finite) <= SPARSE_POINTS  # few samples: mark each, so a straight line is not read as data
    for old, seg in segments:
        cls = "line abandoned" if old else "line"
        if len(seg) > 1:
            parts.append(f'<polyline class="{cls}" points="{" ".join(seg)}"/>')
        for point in seg if sparse or len(seg) == 1 else ():
            x, y = point.split(",")
            parts.append(f'<circle class="dot{" abandoned" if old else ""}" cx="{x}" cy="{y}" r="2"/>')
    parts.append("</svg>")
    return "".join(parts)


FH = 130  # forecast charts: W wide, FH high


def eta_text(eta: Any) -> str:
    e = eta_of(eta)
    if e is None:
        return "no ETA"
    return "at its limit now" if e == 0 else f"ETA ≈ {fmt(e)} steps"


def forecast_svg(c: Curve, eta: Any) -> str:
    """The points a forecast's line was fitted on, the line (to the ETA, clipped: ``agent.curve.view``)
    and the limit as a dashed rule; a log value axis for a "log" curve."""
    v = view(c, eta)

    def px(s: float) -> float:
        return round(LEFT + (s - v.x0) / (v.x1 - v.x0) * (W - LEFT - RIGHT), 1)

    def py(y: float) -> float:
        return round(TOP + (v.hi - v.ty(y)) / (v.hi - v.lo) * (FH - TOP - BOTTOM), 1)

    yl = py(c.limit)
    ey = TOP + 9 if yl > (TOP + FH - BOTTOM) / 2 else FH - BOTTOM - 4  # ETA labels: away from the limit's rule
    parts = [
        f'<svg class="forecast-chart scale-{_e(c.scale)}" viewBox="0 0 {W} {FH}" width="{W}" height="{FH}" role="img"'
        ' aria-label="fitted points, fitted line and limit">',
        f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{FH - TOP - BOTTOM}"/>',
        f'<text class="ylabel" x="{LEFT - 4}" y="{TOP + 9}" text-anchor="end">{_e(fmt(v.value(v.hi)))}</text>',
        f'<text class="ylabel" x="{LEFT - 4}" y="{FH - BOTTOM}" text-anchor="end">{_e(fmt(v.value(v.lo)))}</text>',
        f'<text class="xlabel" x="{LEFT}" y="{FH - 4}" text-anchor="start">{math.floor(v.x0)}</text>',
        f'<text class="xlabel" x="{W - RIGHT}" y="{FH - 4}" text-anchor="end">step {math.floor(v.x1 + 0.5)}</text>',
        f'<line class="limit" x1="{LEFT}" x2="{W - RIGHT}" y1="{yl}" y2="{yl}" stroke-dasharray="5 3"/>',
        f'<text class="limit-label" x="{LEFT + 3}" y="{yl + 10 if yl < TOP + 12 else yl - 3}" text-anchor="start">'
        f"limit {_e(fmt(c.limit))}</text>",
    ]
    if v.eta_shown and v.eta_step is not None:
        xe = px(v.eta_step)
        parts.append(f'<line class="eta" x1="{xe}" x2="{xe}" y1="{TOP}" y2="{FH - BOTTOM}"/>')
        parts.append(f'<text class="eta-label" x="{xe - 2}" y="{ey}" text-anchor="end">ETA</text>')
    elif v.eta_step is not None:
        parts.append(
            f'<text class="eta-off" x="{W - RIGHT - 2}" y="{ey}" text-anchor="end">'
            f"ETA at step {math.floor(v.eta_step + 0.5)} →</text>"
        )
    if v.line is not None:
        (s0, y0), (s1, y1) = v.line
        parts.append(f'<polyline class="fit" points="{px(s0)},{py(y0)} {px(s1)},{py(y1)}"/>')
    for s, y in zip(c.steps, c.values):
        parts.append(f'<circle class="point" cx="{px(s)}" cy="{py(y)}" r="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def forecast_figure(fc: dict) -> str:
    """One forecast: predictor, layer, severity and ETA, its chart (or why there is none), its message."""
    sev = fc.get("severity") if fc.get("severity") in ("warning", "critical") else None
    caption = (
        f'<figcaption><span class="fc-predictor">{_e(fc.get("predictor"))}</span>'
        f' <span class="fc-layer">{_e(fc.get("layer") or "")}</span>'
        f' <span class="sev sev-{sev or "none"}">{sev or "watching"}</span>'
        f' <span class="fc-eta">{_e(eta_text(fc.get("eta_steps")))}</span></figcaption>'
    )
    c = check(fc.get("curve"))
    if isinstance(c, Curve):
        body = forecast_svg(c, fc.get("eta_steps"))
    else:
        body = f'<p class="note">no chart: {_e(fc.get("curve_note") or c)}</p>'
    return (
        f'<figure class="forecast" data-predictor="{_e(fc.get("predictor"))}">{caption}{body}'
        f'<p class="fc-message">{_e(fc.get("message") or "")}</p></figure>'
    )


def _run_card(run: dict) -> str:
    risk = run["risk"]
    badge = ""
    if risk is not None:
        level = risk_level(float(risk["score"]))
        badge = f'<span class="risk risk-{level}">risk {_e(fmt(risk["score"]))}</span>'
    if run.get("state") == "quiet":
        badge += f'<span class="state state-quiet" title="{_e(QUIET_TITLE)}">stopped</span>'
    facts = [("step", "step", str(run["step"]))]
    for key, label in SHOWN_SCALARS:
        if key in run["scalars"]:
            value = run["scalars"][key]
            facts.append((key, label, fmt_duration(value) if key == "step_duration_seconds" else fmt(value)))
    facts.append(("age", "last message", fmt_age(float(run["age_seconds"]))))
    facts.append(("ranks", *fmt_ranks(run["ranks"])))
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
        shared = x_range(run["charts"])
        for key, label in CHARTS:
            c = run["charts"][key]
            if c["steps"]:
                latest = fmt(c["values"][-1])
                svg = chart_svg(key, c["steps"], c["values"], shared)
                figures.append(
                    f'<figure class="chart" data-chart="{key}"><figcaption>{_e(label)}'
                    f' <span class="latest">{_e(latest)}</span></figcaption>{svg}</figure>'
                )
        charts = f'<div class="charts">{"".join(figures)}</div>'
    shown = run.get("forecasts") or []
    forecasts = f'<div class="forecasts">{"".join(forecast_figure(f) for f in shown)}</div>' if shown else ""
    notes = "".join(f'<li class="note">{_e(n)}</li>' for n in run["notes"])
    return (
        f'<article class="run{" quiet" if run.get("state") == "quiet" else ""}" data-run="{_e(run["run"])}"><h2><span class="name">{_e(run["run"])}</span> {badge}</h2>'
        f'<dl class="facts">{dl}</dl>{explanation}{charts}{forecasts}'
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
            f'<tr{cls}><td>{_e(fmt_time(ev.get("time")))}</td><td title="{_e(ev.get("run") or "")}">{_e(ev.get("run") or "")}</td>'
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


SCRIPT = script(
    W=W, H=H, FH=FH, LEFT=LEFT, RIGHT=RIGHT, TOP=TOP, BOTTOM=BOTTOM, POLL=POLL_MILLISECONDS, SPARSE=SPARSE_POINTS,
    ETA_LABEL=ETA_LABEL, QUIET_TITLE=QUIET_TITLE, EXTEND=EXTEND, STRETCH=STRETCH, PAD=PAD,
)  # fmt: skip
