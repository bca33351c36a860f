"""The status page's stylesheet and script (agent/status_html.py inlines both, under the page's nonce).

The script fetches ``api/status`` every ``POLL`` ms and redraws the cards, their charts and
forecasts, and the events table with DOM calls only (``textContent``, ``createElementNS``):
nothing from the network is ever parsed as markup.  Its drawing mirrors the server's
(``chart_svg``, ``forecast_svg``; ``forecastView`` is ``agent.curve.view``), so the page looks the
same before and after its first redraw.
"""

from __future__ import annotations

import json

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:12px 20px;max-width:1100px;
color:#1d2330;background:#f6f7f9}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 18px;border-bottom:1px solid #d8dce3;margin-bottom:10px}
h1{font-size:20px;margin:6px 0}h2{font-size:16px;margin:0 0 8px}
#summary,.updated,nav{margin:4px 0;color:#4a5263}.updated.stale{color:#b3261e;font-weight:600}
a{color:#1a5fb4}
.run{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:12px 14px;margin:0 0 12px}
.run h2{display:flex;align-items:center;gap:10px;overflow-wrap:anywhere}
.state{font-size:13px;padding:2px 8px;border-radius:10px;font-weight:600;white-space:nowrap;background:#eceef2;color:#4a5263}
.run.quiet{background:#fbfbfc}.run.quiet dd.age{color:#7a5200}
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
svg.chart-risk .line{stroke:#c0392b}svg .line.abandoned{stroke:#9aa3b2;stroke-dasharray:3 2;stroke-width:1.2}
svg .dot.abandoned{fill:#9aa3b2}svg .dot{fill:#1a5fb4}svg.chart-risk .dot{fill:#c0392b}svg .nonfinite{stroke:#d0021b;stroke-width:1.5}
svg text{font-size:10px;fill:#5d6678;font-variant-numeric:tabular-nums}
.notes{margin:4px 0;padding-left:18px;color:#6b5900;font-size:13px}.empty{color:#4a5263}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dce3}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-size:12px;color:#5d6678;font-weight:600}td:first-child{white-space:nowrap}
td:nth-child(2){white-space:nowrap;max-width:24ch;overflow:hidden;text-overflow:ellipsis}
tr.sev-warning td{background:#fffaeb}tr.sev-critical td{background:#fdecec}
.forecasts{display:flex;flex-wrap:wrap;gap:10px 16px;margin-top:10px}.forecast{margin:0;width:320px}
.forecast figcaption{display:flex;flex-wrap:wrap;gap:2px 6px;align-items:baseline}
.fc-predictor{font-weight:600;color:#1d2330}.fc-layer{word-break:break-all}
.sev{font-size:11px;padding:0 6px;border-radius:8px;font-weight:600}.sev-warning{background:#fff1cc;color:#7a5200}
.sev-critical{background:#fbdcdc;color:#a1141a}.sev-none{background:#eceef2;color:#4a5263}
.fc-message{margin:2px 0;font-size:12px;color:#4a5263;word-break:break-word}.forecast .note{font-size:12px;color:#6b5900}
svg .limit{stroke:#c0392b;stroke-width:1.2}svg .limit-label,svg .eta-off{fill:#a1141a}
svg .fit{fill:none;stroke:#e08a00;stroke-width:1.6}svg .point{fill:#1a5fb4}svg .eta{stroke:#7a5200;stroke-dasharray:2 2}
"""


def script(**constants: object) -> str:
    """The page's script, with ``constants`` (chart geometry, labels) defined at its top as JSON."""
    head = "".join(f"  const {name} = {json.dumps(value)};\n" for name, value in constants.items())
    return '"use strict";\n(function () {\n' + head + SCRIPT_BODY


SCRIPT_BODY = """  const CHARTS = [["loss", "loss"], ["grad_norm", "grad norm"], ["risk", "risk"]];
  const SHOWN = [["loss", "loss"], ["grad_norm", "grad norm"], ["lr", "lr"], ["step_duration_seconds", "step time"]];
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
  function fmtDuration(s) {  // status_html.fmt_duration
    if (!isNum(s)) return fmt(s);
    const a = Math.abs(s);
    if (a === 0 || a >= 1) return fmt(s) + " s";
    if (a >= 1e-4) return fmt(s * 1e3) + " ms";
    return fmt(s * 1e6) + " \\u00b5s";
  }
  function fmtRanks(r) {
    return r.length === 1 ? ["rank", String(r[0])] : ["ranks", `${r.length} (${r[0]}\\u2026${r[r.length - 1]})`];
  }
  function abandonedOf(steps) {  // status_html.timelines
    const out = new Array(steps.length).fill(false);
    let later = Infinity;
    for (let i = steps.length - 1; i >= 0; i--) { out[i] = later <= steps[i]; later = Math.min(later, steps[i]); }
    return out;
  }
  function fmtTime(t) { return typeof t === "number" ? new Date(t * 1000).toISOString().slice(11, 19) : "\\u2013"; }
  function fmtAge(s) {
    if (s < 120) return Math.round(s) + " s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function level(score) { return score >= 0.7 ? "high" : score >= 0.3 ? "medium" : "low"; }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function chart(name, steps, values, xr) {
    const fin = values.filter(isNum);
    const lo = xr ? xr[0] : Math.min(...steps), hi = xr ? xr[1] : Math.max(...steps);
    let x0 = lo, x1 = hi;
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
    svg.append(sv("text", {class: "xlabel", x: LEFT, y: H - 4, "text-anchor": "start"}, String(lo)));
    svg.append(sv("text", {class: "xlabel", x: W - RIGHT, y: H - 4, "text-anchor": "end"}, "step " + hi));
    for (const [i, s] of steps.entries()) {
      if (!isNum(values[i])) svg.append(sv("line", {class: "nonfinite", x1: px(s), x2: px(s), y1: TOP, y2: H - BOTTOM}));
    }
    const old = abandonedOf(steps);
    const segs = [{old: false, pts: []}];
    steps.forEach((s, i) => {
      const v = values[i], last = segs[segs.length - 1];
      if (last.pts.length && (!isNum(v) || old[i] !== last.old || (i > 0 && s <= steps[i - 1]))) {
        segs.push({old: old[i], pts: []});
      } else if (!last.pts.length) last.old = old[i];
      if (isNum(v)) segs[segs.length - 1].pts.push(px(s) + "," + py(v));
    });
    const sparse = fin.length <= SPARSE;
    for (const seg of segs) {
      const cls = seg.old ? " abandoned" : "";
      if (seg.pts.length > 1) svg.append(sv("polyline", {class: "line" + cls, points: seg.pts.join(" ")}));
      for (const point of (sparse || seg.pts.length === 1) ? seg.pts : []) {
        const [x, y] = point.split(",");
        svg.append(sv("circle", {class: "dot" + cls, cx: x, cy: y, r: 2}));
      }
    }
    return svg;
  }
  function etaOf(v) { return isNum(v) && v >= 0 ? v : null; }
  function etaText(v) {
    const e = etaOf(v);
    return e === null ? "no ETA" : e === 0 ? "at its limit now" : "ETA \u2248 " + fmt(e) + " steps";
  }
  function curveAt(c, s) {
    if (c.scale === "log") return c.at_value * Math.exp(Math.min(700, c.slope * (s - c.at_step)));
    return c.at_value + c.slope * (s - c.at_step);
  }
  function drawable(c) {
    return !!c && (c.scale === "log" || c.scale === "linear") && Array.isArray(c.steps) && Array.isArray(c.values)
      && c.steps.length > 0 && c.steps.length === c.values.length && c.steps.every(isNum) && c.values.every(isNum)
      && [c.slope, c.at_step, c.at_value, c.limit].every(isNum) && (c.scale === "linear" || c.limit > 0);
  }
  function forecastView(c, eta) {  // agent.curve.view
    const log = c.scale === "log";
    const first = c.steps[0], last = c.steps[c.steps.length - 1];
    const span = Math.max(last - first, 1);
    const e = etaOf(eta);
    const etaStep = e === null ? null : c.at_step + e;
    const hasLine = c.slope !== 0 && (c.at_value > 0 || !log);
    let end = etaStep !== null && hasLine ? etaStep : last + STRETCH * span;
    end = Math.min(Math.max(end, last), last + EXTEND * span);
    const x0 = first, x1 = Math.max(end, first + 1);
    let line = hasLine ? [[x0, curveAt(c, x0)], [end, curveAt(c, end)]] : null;
    if (line && !line.every(([, v]) => isFinite(v) && (v > 0 || !log))) line = null;
    const ys = [...c.values, c.limit, ...(line ? [line[0][1], line[1][1]] : [])];
    const t = log ? ys.map(Math.log10) : ys;
    const lo = Math.min(...t), hi = Math.max(...t);
    const pad = hi > lo ? (hi - lo) * PAD : (log ? 0.05 : Math.abs(lo) * 0.05 || 1);
    return {x0, x1, line, etaStep, etaShown: etaStep !== null && etaStep <= x1 + 1e-9, lo: lo - pad, hi: hi + pad,
            ty: log ? Math.log10 : (y => y), value: log ? (y => Math.pow(10, y)) : (y => y)};
  }
  function forecastChart(c, eta) {
    const v = forecastView(c, eta);
    const px = s => Math.round((LEFT + (s - v.x0) / (v.x1 - v.x0) * (W - LEFT - RIGHT)) * 10) / 10;
    const py = y => Math.round((TOP + (v.hi - v.ty(y)) / (v.hi - v.lo) * (FH - TOP - BOTTOM)) * 10) / 10;
    const svg = sv("svg", {class: "forecast-chart scale-" + c.scale, viewBox: `0 0 ${W} ${FH}`, width: W, height: FH,
                           role: "img", "aria-label": "fitted points, fitted line and limit"});
    svg.append(sv("rect", {class: "plot", x: LEFT, y: TOP, width: W - LEFT - RIGHT, height: FH - TOP - BOTTOM}));
    svg.append(sv("text", {class: "ylabel", x: LEFT - 4, y: TOP + 9, "text-anchor": "end"}, fmt(v.value(v.hi))));
    svg.append(sv("text", {class: "ylabel", x: LEFT - 4, y: FH - BOTTOM, "text-anchor": "end"}, fmt(v.value(v.lo))));
    svg.append(sv("text", {class: "xlabel", x: LEFT, y: FH - 4, "text-anchor": "start"}, String(Math.floor(v.x0))));
    svg.append(sv("text", {class: "xlabel", x: W - RIGHT, y: FH - 4, "text-anchor": "end"},
                  "step " + Math.floor(v.x1 + 0.5)));
    const yl = py(c.limit);
    const ey = yl > (TOP + FH - BOTTOM) / 2 ? TOP + 9 : FH - BOTTOM - 4;  // ETA labels: away from the limit's rule
    svg.append(sv("line", {class: "limit", x1: LEFT, x2: W - RIGHT, y1: yl, y2: yl, "stroke-dasharray": "5 3"}));
    svg.append(sv("text", {class: "limit-label", x: LEFT + 3, y: yl < TOP + 12 ? yl + 10 : yl - 3,
                           "text-anchor": "start"}, "limit " + fmt(c.limit)));
    if (v.etaShown) {
      const xe = px(v.etaStep);
      svg.append(sv("line", {class: "eta", x1: xe, x2: xe, y1: TOP, y2: FH - BOTTOM}));
      svg.append(sv("text", {class: "eta-label", x: xe - 2, y: ey, "text-anchor": "end"}, "ETA"));
    } else if (v.etaStep !== null) {
      svg.append(sv("text", {class: "eta-off", x: W - RIGHT - 2, y: ey, "text-anchor": "end"},
                    "ETA at step " + Math.floor(v.etaStep + 0.5) + " \u2192"));
    }
    if (v.line) {
      const [[s0, y0], [s1, y1]] = v.line;
      svg.append(sv("polyline", {class: "fit", points: `${px(s0)},${py(y0)} ${px(s1)},${py(y1)}`}));
    }
    c.steps.forEach((s, i) => svg.append(sv("circle", {class: "point", cx: px(s), cy: py(c.values[i]), r: 2})));
    return svg;
  }
  function forecastFigure(f) {
    const sev = f.severity === "warning" || f.severity === "critical" ? f.severity : null;
    const cap = el("figcaption", {}, [
      el("span", {class: "fc-predictor"}, [String(f.predictor)]), " ",
      el("span", {class: "fc-layer"}, [String(f.layer || "")]), " ",
      el("span", {class: "sev sev-" + (sev || "none")}, [sev || "watching"]), " ",
      el("span", {class: "fc-eta"}, [etaText(f.eta_steps)])]);
    const body = drawable(f.curve) ? forecastChart(f.curve, f.eta_steps)
      : el("p", {class: "note"}, ["no chart: " + String(f.curve_note || "no curve in its evidence")]);
    return el("figure", {class: "forecast", "data-predictor": String(f.predictor)},
              [cap, body, el("p", {class: "fc-message"}, [String(f.message || "")])]);
  }
  function card(run) {
    const name = el("span", {class: "name"}, [run.run]);
    const h = el("h2", {}, [name, " "]);
    if (run.risk) {
      h.append(el("span", {class: "risk risk-" + level(run.risk.score)}, ["risk " + fmt(run.risk.score)]));
    }
    if (run.state === "quiet") h.append(el("span", {class: "state state-quiet", title: QUIET_TITLE}, ["stopped"]));
    const facts = [["step", "step", String(run.step)]];
    for (const [k, label] of SHOWN) {
      if (!(k in run.scalars)) continue;
      facts.push([k, label, k === "step_duration_seconds" ? fmtDuration(run.scalars[k]) : fmt(run.scalars[k])]);
    }
    facts.push(["age", "last message", fmtAge(run.age_seconds)]);
    facts.push(["ranks", ...fmtRanks(run.ranks)]);
    if (run.dropped) facts.push(["dropped", "dropped", String(run.dropped)]);
    const dl = el("dl", {class: "facts"},
                  facts.map(([k, label, v]) => el("div", {}, [el("dt", {}, [label]), el("dd", {class: k}, [v])])));
    const art = el("article", {class: run.state === "quiet" ? "run quiet" : "run", "data-run": run.run}, [h, dl]);
    if (run.risk) {
      art.append(el("p", {class: "explanation"}, [run.risk.explanation]));
      const etas = Object.entries(run.risk.etas).map(([k, v]) => `${k} \u2248 ${fmt(v)}`).join(", ");
      if (etas) art.append(el("p", {class: "etas"}, [ETA_LABEL + etas]));
    }
    if (run.charts) {
      const all = Object.values(run.charts).flatMap(c => c.steps);
      const xr = all.length ? [Math.min(...all), Math.max(...all)] : null;
      const figs = [];
      for (const [k, label] of CHARTS) {
        const c = run.charts[k];
        if (!c.steps.length) continue;
        const cap = el("figcaption", {}, [label + " ", el("span", {class: "latest"}, [fmt(c.values[c.values.length - 1])])]);
        figs.push(el("figure", {class: "chart", "data-chart": k}, [cap, chart(k, c.steps, c.values, xr)]));
      }
      art.append(el("div", {class: "charts"}, figs));
    }
    if (run.forecasts && run.forecasts.length) art.append(el("div", {class: "forecasts"}, run.forecasts.map(forecastFigure)));
    if (run.notes.length) art.append(el("ul", {class: "notes"}, run.notes.map(n => el("li", {class: "note"}, [n]))));
    return art;
  }
  function eventRow(ev) {
    const sev = ev.severity === "warning" || ev.severity === "critical" ? {class: "sev-" + ev.severity} : {};
    return el("tr", sev, [fmtTime(ev.time), ev.run || "", String(ev.type), String(ev.summary)]
      .map((t, i) => el("td", i === 1 ? {title: t} : {}, [t])));
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
