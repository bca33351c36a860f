"""From statistics to commands: predictors, policy and event log for every run, in one place.

The receiver thread calls ``observe`` for every accepted message (and ``sentinel-agent replay``
does the same offline).  For each detection the policy decides; the decision is written to the
event log and fsynced, and only then are its commands handed to ``send`` (the command server).
If the write fails the decision is not taken: no command ever leaves without its record.

It also watches for the trainer going back (a step lower than the previous one of the run's
primary rank): the predictors forget the abandoned steps and the policy starts a new timeline
epoch, recorded as a ``rewind`` event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.events import EventLog
from agent.history import SeriesHistory
from agent.policy import SUPPRESS_REASONS, Decision, Policy
from agent.predict import Detection, Forecast, Risk, SeriesPredictor
from agent.recording import StatsRecorder
from sentinel_contract.commands import Command
from sentinel_contract.protocol import StatsMessage

logger = logging.getLogger("sentinel.agent")


@dataclass(frozen=True)
class RunStatus:
    run: str
    step: int
    risk: Risk
    etas: dict[str, float]
    top: dict[str, Forecast]


@dataclass(frozen=True)
class SupervisorSnapshot:
    runs: list[RunStatus]
    detections: dict[tuple[str, str, str], int]
    actions: dict[str, int]
    suppressed: dict[str, int]
    event_log_errors: int


class _Run:
    def __init__(self) -> None:
        self.predictors: dict[int, SeriesPredictor] = {}
        self.last_step: dict[int, int] = {}
        self.primary: int | None = None
        self.detections: dict[tuple[str, str], int] = {}
        self.risk_recorded: tuple | None = None  # files opened and predictor versions at the last risk line


class Supervisor:
    """Predictors per run/rank, one policy, one event log; thread-safe."""

    def __init__(
        self,
        config: AgentConfig,
        events: EventLog,
        *,
        send: Callable[[Sequence[Command]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.events = events
        self.send = send
        self.clock = clock
        self.policy = Policy(config.policy)
        self.max_runs = config.limits.max_series
        self.decisions: list[Decision] = []  # kept only when keep_decisions (replay)
        self.keep_decisions = False
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._actions: dict[str, int] = {}
        self._suppressed = dict.fromkeys(SUPPRESS_REASONS, 0)
        self._event_log_errors = 0
        self._lock = threading.Lock()
        self.on_decision: Callable[[Decision], None] | None = None
        self.recorder: StatsRecorder | None = None  # set by the agent: risk lines for run reports

    def restore(self, records: list[dict]) -> None:
        """Read back an events file so that no decision is taken twice."""
        with self._lock:
            n = self.policy.restore(records)
            for run, st in self.policy.runs.items():
                if st.last_step is not None:
                    r = self._run(run)
                    r.last_step.setdefault(0, st.last_step)
        if n:
            logger.info("restored %d earlier decisions from %s", n, self.events.path)

    def _run(self, run: str) -> _Run:
        r = self._runs.get(run)
        if r is None:
            if len(self._runs) >= self.max_runs:
                self._runs.popitem(last=False)
            r = self._runs[run] = _Run()
        else:
            self._runs.move_to_end(run)
        return r

    def wants(self, msg: StatsMessage) -> bool:
        return self.config.predict.enabled and (self.config.predict.ranks == "all" or msg.rank == 0)

    def observe(self, msg: StatsMessage, series: SeriesHistory, *, act: bool = True) -> list[Decision]:
        """Run the predictors on one message (already in ``series``) and act on what they find.

        ``act=False`` only brings the predictors' state up to date (warm start from the
        recordings, agent/warm.py): nothing is counted, logged, written or sent.
        """
        if not self.wants(msg):
            return []
        with self._lock:
            r = self._run(msg.run)
            if r.primary is None or msg.rank < r.primary:
                r.primary = msg.rank
            pred = r.predictors.get(msg.rank)
            if pred is None:
                pred = r.predictors[msg.rank] = SeriesPredictor(msg.run, msg.rank, self.config.predict)
            last = r.last_step.get(msg.rank)
            rewind = None
            if last is not None and msg.step < last:
                pred.rewind(msg.step)
                if act and msg.rank == r.primary:
                    rewind = self.policy.rewind(msg.run, last, msg.step)
            r.last_step[msg.rank] = msg.step
            detections = pred.observe(msg, series)
            if not act:
                return []
            for d in detections:
                key = (d.detector, d.severity)
                r.detections[key] = r.detections.get(key, 0) + 1
        if rewind is not None:
            logger.info("run %s went back from step %d to %d (timeline %d)", msg.run, last, msg.step, rewind["epoch"])
            self._write(rewind)
        decisions = [d for d in (self._act(det) for det in detections) if d is not None]
        if self.recorder is not None and msg.rank == r.primary:
            self._record_risk(msg, r)
        return decisions

    def _record_risk(self, msg: StatsMessage, r: _Run) -> None:
        """The run's risk and ETAs after this message, into its recording (for run reports); not
        even computed while no predictor of the run changed, none has a detection decaying and the
        recording opened no file (each file carries its own risk line)."""
        assert self.recorder is not None
        with self._lock:
            key = (self.recorder.opened, *((rank, p.version) for rank, p in r.predictors.items()))
            if key == r.risk_recorded and all(p.risk_settled() for p in r.predictors.values()):
                return
            r.risk_recorded = key
            status = self._status(msg.run, r)
        if status is not None:
            risk = status.risk
            self.recorder.record_risk(
                msg.run, msg.rank, msg.step, self.clock(), score=risk.score, predictor=risk.predictor,
                layer=risk.layer, eta=status.etas, explanation=risk.explanation,
            )  # fmt: skip

    def _act(self, det: Detection) -> Decision | None:
        log = logger.warning if det.severity == "critical" else logger.info
        log("detection run=%s step=%d %s/%s: %s", det.run, det.step, det.detector, det.severity, det.message)
        with self._lock:
            decision = self.policy.decide(det, now=self.clock())
        if decision is None:
            return None
        if not self._write(decision.record()):
            return None
        with self._lock:
            self.policy.commit(decision)
            if decision.suppressed:
                self._suppressed[decision.suppressed] += 1
            else:
                self._actions[decision.action] = self._actions.get(decision.action, 0) + 1
            if self.keep_decisions:
                self.decisions.append(decision)
        if decision.suppressed:
            logger.info("decision suppressed (%s): %s", decision.suppressed, decision.reason)
            return decision
        (logger.error if decision.action == "stop" else logger.warning)("decision %s: %s", decision.id, decision.reason)
        if self.on_decision is not None:
            self.on_decision(decision)
        if self.send is not None and decision.commands:
            self.send(decision.commands)
        return decision

    def _write(self, record: dict) -> bool:
        try:
            self.events.append(record)
            return True
        except OSError as exc:
            with self._lock:
                self._event_log_errors += 1
            logger.error("cannot write the event log %s (%s); decision not taken", self.events.path, exc)
            return False

    @staticmethod
    def _status(name: str, r: _Run) -> RunStatus | None:
        """Risk (the largest of the ranks'), smallest ETA and riskiest forecast per predictor; under the lock."""
        preds = list(r.predictors.values())
        if not preds:
            return None
        risk = max((p.risk() for p in preds), key=lambda x: x.score)
        etas: dict[str, float] = {}
        top: dict[str, Forecast] = {}
        for p in preds:
            for k, v in p.etas().items():
                etas[k] = min(etas.get(k, v), v)
            for k, f in p.top_forecasts().items():
                if k not in top or f.risk > top[k].risk:
                    top[k] = f
        step = max(r.last_step.values()) if r.last_step else -1
        return RunStatus(name, step, risk, etas, top)

    def snapshot(self) -> SupervisorSnapshot:
        with self._lock:
            runs, detections = [], {}
            for name, r in self._runs.items():
                status = self._status(name, r)
                if status is None:
                    continue
                runs.append(status)
                for (det, sev), n in r.detections.items():
                    detections[(name, det, sev)] = n
            return SupervisorSnapshot(
                runs, detections, dict(self._actions), dict(self._suppressed), self._event_log_errors
            )
