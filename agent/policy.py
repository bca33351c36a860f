"""Policy: which detection gets which action, with the limits that keep recovery from looping.

Rules (``policy.rules`` in agent.yaml) are tried in order; the first whose detector matches
and whose severity is at or below the detection's decides.  The defaults are the PaLM recipe
(Chowdhery et al.: restart about 100 steps before the spike and skip 200-500 batches) for a
critical loss spike or a NaN/Inf loss or gradient norm; skipping one update for a critical
gradient-norm spike (OLMo-core's SkipStepAdamW, ZClip); a warning for everything else.

Limits, all counted in *trained* steps (the step number plus every step the run went back,
so a rollback does not reset them):

* ``cooldown_steps``: after an action, no action of the same or lower strength for the run
  (strength: warn < lr_scale < skip_update < skip_batches < rollback < stop; warnings are
  limited by the predictors' episodes instead) until the trainer is seen going back;
* after a rollback, nothing until the trainer is seen going back (or the cooldown ends): the
  statistics still in flight belong to the abandoned timeline;
* escalation: a rollback within ``escalation.within_steps`` of the previous one goes further
  back and skips more (× the factors per level) and also scales the learning rate;
* ``max_rollbacks`` per ``rollback_window_steps``: the next one is a ``stop`` instead, for a
  person to look at.  Once stopped, the run gets no further action until it is seen
  restarting from an earlier step, which starts it with a clean slate.

``decide`` is pure; ``commit`` applies a decision once its record is durably written, and
``restore`` replays an events file, so a restarted agent neither repeats a decision (same run,
timeline epoch, step, detector and layer) nor forgets its limits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from agent.predict import DETECTORS, SEVERITIES, Detection, severity_rank
from sentinel_contract.actions import ACTIONS, STRENGTH
from sentinel_contract.commands import Command, CommandError, decode
from sentinel_contract.typedconfig import ConfigError, build, option

PALM_ROLLBACK = {"steps_back": 100, "skip": 200}
DEFAULT_RULES = [
    {"detector": "nonfinite", "severity": "critical", "action": "rollback", "args": dict(PALM_ROLLBACK)},
    {"detector": "loss_spike", "severity": "critical", "action": "rollback", "args": dict(PALM_ROLLBACK)},
    {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
]
SUPPRESS_REASONS = ("cooldown", "pending_rollback", "stopped")

#: prevention's remedy per precursor detector: undo the trend and lower the LR, undo a bad write, lower ε
REMEDIES = {
    "attn_logit": "rollback_lr",
    "log_z": "rollback_lr",
    "update_ratio": "rollback_lr",
    "update_ratio_spread": "rollback_lr",
    "out_rms": "rollback_lr",
    "param_integrity": "rollback",
    "adam_eps": "eps",
}


@dataclass
class Rule:
    detector: str = option("*", choices=(*DETECTORS, "*"), doc="Detector this rule answers; '*' for any.")
    severity: str = option("warning", choices=SEVERITIES, doc="Lowest detection severity the rule answers.")
    action: str = option("warn", choices=tuple(ACTIONS), doc="Command sent to the trainer.")
    args: dict[str, Any] = option({}, doc="Arguments of the action, as in docs/protocol.md (Commands).")

    def matches(self, det: Detection) -> bool:
        return self.detector in ("*", det.detector) and severity_rank(det.severity) >= severity_rank(self.severity)


@dataclass
class EscalationConfig:
    within_steps: int = option(
        1000, range=(0, 100_000_000), doc="A rollback this many trained steps after the previous one escalates."
    )
    steps_back_factor: float = option(2.0, range=(1.0, 100.0), doc="steps_back multiplier per escalation level.")
    skip_factor: float = option(2.0, range=(1.0, 100.0), doc="skip multiplier per escalation level.")
    lr_factor: float = option(
        0.5, range=(1e-6, 1.0), doc="lr_scale factor sent with every escalated rollback (1: none)."
    )


@dataclass
class PreventionConfig:
    enabled: bool = option(
        False,
        doc="Act on a critical forecast of a precursor detector before the loss moves (docs/policy.md, 'Prevention').",
    )
    severity: str = option(
        "critical",
        choices=SEVERITIES,
        doc="Lowest severity prevention acts on: 'critical' (an ETA within trend.critical_eta_steps, or past "
        "the limit) or also 'warning' (an ETA within trend.warn_eta_steps).",
    )
    detectors: list[str] = option(
        list(REMEDIES),
        doc=f"Detectors prevention answers; each has its remedy ({', '.join(f'{k}: {v}' for k, v in REMEDIES.items())}).",
    )
    lr_factor: float = option(
        0.25,
        range=(1e-6, 1.0),
        doc="lr_scale factor of the rollback_lr remedy (zoo: 0.5 kept 2 of 9 attention-logit divergences within their twin's noise, 0.25 kept 7).",
    )
    eps_factor: float = option(
        1e-3, range=(1e-12, 1.0), doc="eps_scale factor of the eps remedy (ε is only ever lowered)."
    )
    margin_steps: int = option(
        10, range=(0, 1_000_000), doc="Steps before the trend's first point that the rollback goes back to."
    )
    max_steps_back: int = option(
        1000, range=(1, 10_000_000), doc="A rollback to before a trend goes back at most this many steps."
    )


@dataclass
class PolicyConfig:
    enabled: bool = option(True, doc="Turn detections into decisions (false: detect and export only).")
    rules: list[dict] = option(
        DEFAULT_RULES,
        doc="Ordered rules {detector, severity, action, args}; the first that matches decides "
        "(docs/policy.md). Detections no rule matches are counted and logged only.",
    )
    cooldown_steps: int = option(
        50, range=(0, 100_000_000), doc="Trained steps after an action during which no action as strong is taken."
    )
    max_rollbacks: int = option(
        3, range=(1, 1000), doc="Rollbacks allowed per `rollback_window_steps`; the next decision is `stop`."
    )
    rollback_window_steps: int = option(
        10_000, range=(1, 1_000_000_000), doc="Window of trained steps for `max_rollbacks`."
    )
    escalation: EscalationConfig = field(default_factory=EscalationConfig)
    prevention: PreventionConfig = field(default_factory=PreventionConfig)


def parse_rules(rules: list[dict], prefix: str = "policy.rules") -> list[Rule]:
    """Typed rules; ConfigError names the rule and key, e.g. ``policy.rules[1].args: ...``."""
    out = []
    for i, raw in enumerate(rules):
        rule = build(Rule, raw, prefix=f"{prefix}[{i}].")
        probe = Command(id="x", run="x", action=rule.action, args=rule.args)
        try:
            checked = decode(probe.encode())
        except (CommandError, ValueError, TypeError) as exc:
            raise ConfigError(f"{prefix}[{i}].args: {getattr(exc, 'detail', exc)}") from None
        rule.args = dict(checked.args)
        out.append(rule)
    return out


def decision_key(epoch: int, d: Detection) -> tuple:
    """What makes a decision the same one: a critical detection after a warning of the same detector at
    the same step (a probe message's NaN, then the loss's) is a new decision."""
    return (epoch, d.step, d.detector, d.layer or "", d.severity)


def _digest(*parts: object) -> str:
    return hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Decision:
    """What the policy concluded from one detection: commands to send, or why none."""

    id: str
    detection: Detection
    epoch: int
    clock: int
    action: str
    commands: tuple[Command, ...] = ()
    rule: int | None = None
    level: int = 0
    reason: str = ""
    suppressed: str | None = None

    @property
    def run(self) -> str:
        return self.detection.run

    @property
    def step(self) -> int:
        return self.detection.step

    @property
    def key(self) -> tuple:
        d = self.detection
        return decision_key(self.epoch, d)

    def record(self) -> dict:
        """The events.jsonl record (type 'decision' or 'suppressed')."""
        d = self.detection
        rec = {
            "type": "suppressed" if self.suppressed else "decision",
            "id": self.id,
            "run": d.run,
            "rank": d.rank,
            "step": d.step,
            "epoch": self.epoch,
            "clock": self.clock,
            "detector": d.detector,
            "severity": d.severity,
            "statistic": d.statistic,
            "layer": d.layer,
            "value": d.value,
            "eta_steps": d.eta_steps,
            "evidence": d.evidence,
            "rule": self.rule,
            "action": self.action,
            "level": self.level,
            "reason": self.reason,
        }
        if self.suppressed:
            rec["why"] = self.suppressed
        else:
            rec["commands"] = [{"id": c.id, "action": c.action, "args": c.args} for c in self.commands]
        return rec


@dataclass
class RunPolicyState:
    epoch: int = 0
    offset: int = 0
    last_step: int | None = None
    decided: set = field(default_factory=set)
    last_strength: int = -1
    last_action_clock: int | None = None
    rollback_clocks: list[int] = field(default_factory=list)
    level: int = 0
    pending_until: int | None = None
    stopped: bool = False


class Policy:
    """Decisions for every run; not thread-safe (the supervisor serialises calls)."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.rules = parse_rules(cfg.rules)
        self.runs: dict[str, RunPolicyState] = {}

    def state(self, run: str) -> RunPolicyState:
        st = self.runs.get(run)
        if st is None:
            st = self.runs[run] = RunPolicyState()
        return st

    def clock(self, run: str, step: int) -> int:
        return step + self.state(run).offset

    def is_duplicate(self, det: Detection) -> bool:
        st = self.state(det.run)
        return decision_key(st.epoch, det) in st.decided

    def decide(self, det: Detection, *, now: float = 0.0) -> Decision | None:
        """The decision for ``det``; None when no rule matches or it was already decided."""
        if not self.cfg.enabled or self.is_duplicate(det):
            return None
        prevention = self._prevention(det)
        match = prevention or next(((i, r) for i, r in enumerate(self.rules) if r.matches(det)), None)
        if match is None:
            return None
        index, rule = match
        st = self.state(det.run)
        clock = self.clock(det.run, det.step)
        did = "d-" + _digest(det.run, *decision_key(st.epoch, det))

        def suppressed(why: str, text: str) -> Decision:
            return Decision(did, det, st.epoch, clock, rule.action, rule=index, reason=text, suppressed=why)

        if st.stopped:
            return suppressed("stopped", "the run was stopped; waiting for a person to restart it")
        if st.pending_until is not None and clock < st.pending_until:
            return suppressed("pending_rollback", "a rollback was sent and the trainer has not gone back yet")
        strength = STRENGTH[rule.action]
        if (
            rule.action != "warn"
            and st.last_action_clock is not None
            and strength <= st.last_strength
            and clock - st.last_action_clock < self.cfg.cooldown_steps
        ):
            return suppressed("cooldown", f"within {self.cfg.cooldown_steps} steps of the previous action")

        action, args, level = rule.action, dict(rule.args), 0
        extra: list[tuple[str, dict]] = []
        why = ""
        if action == "rollback":
            recent = [c for c in st.rollback_clocks if clock - c < self.cfg.rollback_window_steps]
            if len(recent) >= self.cfg.max_rollbacks:
                action, args = "stop", {}
                why = (
                    f"; {len(recent)} rollbacks in the last {self.cfg.rollback_window_steps} steps reach "
                    f"policy.max_rollbacks={self.cfg.max_rollbacks}: stopping for a person to look"
                )
            else:
                esc = self.cfg.escalation
                if st.rollback_clocks and clock - st.rollback_clocks[-1] <= esc.within_steps:
                    level = st.level + 1
                if level:
                    args["steps_back"] = _scaled(
                        args["steps_back"], esc.steps_back_factor**level, "rollback", "steps_back"
                    )
                    args["skip"] = _scaled(args["skip"], esc.skip_factor**level, "rollback", "skip")
                    if esc.lr_factor < 1.0:
                        extra.append(("lr_scale", {"factor": esc.lr_factor}))
                    why = f"; escalation level {level}: a spike again within {esc.within_steps} steps of the last rollback"
        if prevention is not None and action == "rollback" and REMEDIES[det.detector] == "rollback_lr" and level == 0:
            extra.append(("lr_scale", {"factor": self._prevention_lr(det)}))
        actions = [(action, args), *extra]
        text = f"{det.detector} ({det.severity}): {det.message} -> {describe_actions(actions)}{why}"[:1000]
        commands = tuple(
            Command(
                id="c-" + _digest(det.run, *decision_key(st.epoch, det), i),
                run=det.run,
                action=a,
                args=kw,
                reason=text,
                issued_at=now,
            )
            for i, (a, kw) in enumerate(actions)
        )
        return Decision(did, det, st.epoch, clock, action, commands, index, level, text)

    def _prevention(self, det: Detection) -> tuple[int, Rule] | None:
        """Prevention's rule for a critical precursor detection (rule index -1), or None.

        ``rollback_lr``: back to before the trend's first point (its ``span_steps`` plus
        ``margin_steps``; at most to step 0), then ``lr_scale``: by ``lr_factor``, or for a jump in the
        update ratios by its inverse (Adam's update is proportional to the LR).  A jump the learning
        rate explains (an LR fault) gets ``lr_scale(lr_before / lr)`` alone: rolling back would replay
        the steps before the jump at the lowered LR, and the schedule's jump would then come again.
        ``rollback``: to before this step.  ``eps``: ``eps_scale(eps_factor)``.
        """
        p = self.cfg.prevention
        if (
            not p.enabled
            or det.severity != "critical"
            or det.detector not in p.detectors
            or det.detector not in REMEDIES
        ):
            return None
        remedy = REMEDIES[det.detector]
        if remedy == "eps":
            return -1, Rule(det.detector, p.severity, "eps_scale", {"factor": p.eps_factor})
        if self._lr_jump(det) is not None:  # the schedule jumped: undo it from here on; a rollback would replay
            return -1, Rule(det.detector, p.severity, "lr_scale", {"factor": self._lr_jump(det)})
        span = det.evidence.get("span_steps") if remedy == "rollback_lr" else None
        back = 1 if not isinstance(span, (int, float)) or not math.isfinite(span) else int(span) + p.margin_steps
        back = max(1, min(back, p.max_steps_back, det.step))
        return -1, Rule(det.detector, p.severity, "rollback", {"steps_back": back, "skip": 0})

    @staticmethod
    def _lr_jump(det: Detection) -> float | None:
        """lr_before / lr when an update-ratio jump is the learning rate's own (it rose at least half as much)."""
        ev = det.evidence
        lr, before, jump = ev.get("lr"), ev.get("lr_before"), ev.get("jump")
        if det.detector != "update_ratio" or not all(isinstance(x, float) for x in (lr, before, jump)):
            return None
        if not (lr > before > 0 and lr / before >= math.sqrt(jump)):
            return None
        return max(1e-6, min(1.0, before / lr))

    def _prevention_lr(self, det: Detection) -> float:
        jump = det.evidence.get("jump")
        if det.detector == "update_ratio" and isinstance(jump, float) and jump > 1:
            return max(1e-6, min(1.0, 1.0 / jump))  # Adam's update is proportional to the LR
        return self.cfg.prevention.lr_factor

    def commit(self, decision: Decision) -> None:
        """Apply a decision whose record was written (a suppressed one changes nothing)."""
        if decision.suppressed:
            return
        self._apply(decision.run, decision.key, decision.action, decision.clock, decision.level)

    def _apply(self, run: str, key: tuple, action: str, clock: int, level: int) -> None:
        st = self.state(run)
        st.decided.add(key)
        if action != "warn":
            st.last_strength, st.last_action_clock = STRENGTH[action], clock
        if action == "rollback":
            st.rollback_clocks = [c for c in st.rollback_clocks if clock - c < self.cfg.rollback_window_steps][
                -self.cfg.max_rollbacks :
            ] + [clock]
            st.level = level
            st.pending_until = clock + max(1, self.cfg.cooldown_steps)
        elif action == "stop":
            st.stopped = True

    def rewind(self, run: str, from_step: int, to_step: int) -> dict:
        """The trainer went back from ``from_step`` to ``to_step``: a new timeline epoch.
        Returns the events.jsonl record (type 'rewind')."""
        st = self.state(run)
        st.offset += max(0, from_step - to_step)
        st.epoch += 1
        _new_timeline(st)
        st.last_step = to_step
        return {
            "type": "rewind",
            "run": run,
            "from_step": from_step,
            "to_step": to_step,
            "epoch": st.epoch,
            "offset": st.offset,
        }

    def restore(self, records: list[dict]) -> int:
        """Rebuild the state from an events file; returns the number of decisions restored."""
        n = 0
        for rec in records:
            run = rec.get("run")
            if not isinstance(run, str):
                continue
            kind = rec.get("type")
            try:
                if kind == "decision":
                    st = self.state(run)
                    key = (int(rec["epoch"]), int(rec["step"]), rec["detector"], rec.get("layer") or "",
                           rec.get("severity", "warning"))  # fmt: skip
                    self._apply(run, key, rec["action"], int(rec["clock"]), int(rec.get("level", 0)))
                    st.last_step = max(st.last_step or 0, int(rec["step"]))
                    n += 1
                elif kind == "rewind":
                    st = self.state(run)
                    st.epoch, st.offset = int(rec["epoch"]), int(rec["offset"])
                    _new_timeline(st)
                    st.last_step = int(rec["to_step"])
            except (KeyError, TypeError, ValueError):
                continue
        return n


def _new_timeline(st: RunPolicyState) -> None:
    """The trainer went back: statistics in flight from the old timeline are gone, so the
    pending rollback and the cooldown end (a spike right after it must escalate); a stopped run
    restarted by a person starts with a clean slate."""
    st.pending_until = None
    st.last_action_clock, st.last_strength = None, -1
    if st.stopped:
        st.stopped = False
        st.rollback_clocks, st.level = [], 0


def _scaled(base: int, factor: float, action: str, name: str) -> int:
    _, _, hi = ACTIONS[action][name]
    return int(min(hi, math.ceil(base * factor)))


def describe_actions(actions: list[tuple[str, dict]]) -> str:
    """``rollback(steps_back=100, skip=200) + lr_scale(factor=0.5)``."""
    parts = []
    for action, args in actions:
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items())
        parts.append(f"{action}({inner})")
    return " + ".join(parts)
