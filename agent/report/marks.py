"""What the event log says happened, as marks to draw on the step axis.

A decision is drawn at the step whose statistics triggered it; the trainer applies its
commands at the next step boundary it reads them (the ``ack`` record's step, in the table).
A rollback's span is the steps the trainer went back over (the ``rewind`` record: from the last
step of the abandoned timeline to the step it landed on), labelled with the batches it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.policy import describe_actions

ACTION_ORDER = ("warn", "lr_scale", "skip_update", "skip_batches", "rollback", "stop")
ACTION_STYLE = {  # colour, line style, width
    "warn": ("#c98a00", ":", 1.0),
    "lr_scale": ("#1f77b4", "--", 1.5),
    "skip_update": ("#9467bd", "--", 1.5),
    "skip_batches": ("#8c564b", "--", 1.5),
    "rollback": ("#d62728", "-", 1.8),
    "stop": ("#000000", "-", 2.2),
}
ACTION_LABEL = {
    "warn": "warn (logged)",
    "lr_scale": "LR change (lr_scale)",
    "skip_update": "update skipped (skip_update)",
    "skip_batches": "batches skipped (skip_batches)",
    "rollback": "rollback",
    "stop": "stop",
}
SEVERITY_COLOR = {"warning": "#ff9f1c", "critical": "#d62728"}


@dataclass(frozen=True)
class Detection:
    step: int
    detector: str
    severity: str
    held_back: str | None  # the policy's reason (cooldown, pending_rollback, stopped) or None
    action: str | None
    layer: str | None


@dataclass(frozen=True)
class Action:
    step: int
    action: str
    text: str  # rollback(steps_back=5, skip=30)
    outcome: str | None  # the trainer's ack status, None if none was recorded


@dataclass(frozen=True)
class Span:
    start: int  # the step the run went back to
    end: int  # the last step of the abandoned timeline
    label: str


@dataclass
class Marks:
    detections: list[Detection] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.detections or self.actions or self.spans)


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def marks_from_events(events: list[dict]) -> Marks:
    """Detections, actions and rollback spans of one run's records (oldest first)."""
    out = Marks()
    acks = {e.get("id"): e.get("status") for e in events if e.get("type") == "ack"}
    pending_rollback: dict | None = None
    for e in events:
        kind, step = e.get("type"), _int(e.get("step"))
        if kind in ("decision", "suppressed") and step is not None:
            held = str(e.get("why") or "held back") if kind == "suppressed" else None
            out.detections.append(
                Detection(step, str(e.get("detector")), str(e.get("severity")), held, e.get("action"), e.get("layer"))
            )
            if kind != "decision":
                continue
            for c in e.get("commands") or []:
                if not isinstance(c, dict) or c.get("action") not in ACTION_STYLE:
                    continue
                args = c.get("args") if isinstance(c.get("args"), dict) else {}
                out.actions.append(
                    Action(step, c["action"], describe_actions([(c["action"], args)]), acks.get(c.get("id")))
                )
                if c["action"] == "rollback":
                    pending_rollback = args
        elif kind == "rewind":
            start, end = _int(e.get("to_step")), _int(e.get("from_step"))
            if start is None or end is None:
                continue
            if pending_rollback is not None:
                skip = pending_rollback.get("skip")
                label = f"rolled back {end}→{start}" + (f", skipped {skip} batches" if skip else "")
            else:
                label = f"went back {end}→{start} (a restart)"
            out.spans.append(Span(start, end, label))
            pending_rollback = None
    return out
