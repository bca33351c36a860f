"""The agent's live status page: what each run is doing now, how risky it looks, what was decided.

``StatusBoard.status()`` builds the ``/api/status`` document (schema in docs/status-page.md)
from the agent's bounded state: the latest scalars and the loss and gradient-norm rings of
``agent.history``, the supervisor's risk score with its one-line explanation
(``agent.predict.SeriesPredictor.risk``), each trend predictor's riskiest current forecast with
the curve it was fitted on (``agent.curve``), and the tail of the event log.  The risk is not
kept by the history, so ``RiskTrail`` keeps a small ring of it per run, sampled from the
supervisor at most every ``RISK_SAMPLE_SECONDS`` on the receiver thread (so the cost per
message is one clock read) and at every status request.

``render_page`` (agent/status_html.py) turns that document into server-rendered HTML with
inline SVG charts; the page's small script (agent/status_assets.py) fetches ``/api/status``
every two seconds and redraws the same elements with DOM calls only (``textContent``,
``createElementNS``), so nothing from the network is ever parsed as markup; the server side
escapes everything with ``html.escape``.  Panels whose data is missing are left out with a note
saying why.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from agent import __version__
from agent.config import AgentConfig
from agent.curve import Curve, check
from agent.events import EventLog, plain
from agent.state import AgentState
from agent.status_html import SHOWN_SCALARS, fmt, render_page
from agent.supervisor import RunStatus, Supervisor, SupervisorSnapshot

__all__ = ["RiskTrail", "StatusBoard", "event_summary", "fmt", "forecasts", "render_page"]

STATUS_VERSION = 1
CHART_POINTS = 240
MAX_CHART_RUNS = 16
RECENT_EVENTS = 20
RISK_SAMPLE_SECONDS = 0.25
QUIET_SECONDS = 10.0  # a run is "quiet" after this long without a message, and 20 of its step times
QUIET_STEPS = 20


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
        age = max(0.0, now - entry["received_at"])
        step_time = entry["scalars"].get("step_duration_seconds")
        step_time = float(step_time) if isinstance(step_time, (int, float)) and math.isfinite(step_time) else 0.0
        return {
            **entry,
            "age_seconds": age,
            "state": "quiet" if age > max(QUIET_SECONDS, QUIET_STEPS * step_time) else "live",
            "risk": risk,
            "charts": charts,
            "forecasts": [] if sup is None else forecasts(sup, curves=charts is not None),
            "notes": notes,
        }


def forecasts(sup: RunStatus, *, curves: bool = True) -> list[dict]:
    """The run's current forecasts, one per trend predictor (``RunStatus.top``), riskiest first, each
    with its curve checked (``agent.curve.check``); ``curves=False`` (a run not charted) leaves them out."""
    out = []
    for f in sorted(sup.top.values(), key=lambda f: (-f.risk, f.predictor)):
        evidence = f.evidence if isinstance(f.evidence, dict) else {}
        c = check(evidence.get("curve")) if curves else "curves are drawn for the most recently updated runs only"
        out.append(
            {
                "predictor": f.predictor,
                "layer": f.layer,
                "statistic": f.statistic,
                "value": f.value,
                "step": f.step,
                "eta_steps": f.eta_steps,
                "severity": f.severity,
                "risk": f.risk,
                "message": f.message,
                "curve": c.to_dict() if isinstance(c, Curve) else None,
                "curve_note": None if isinstance(c, Curve) else c,
            }
        )
    return out


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
