"""The command actions: one table from which the wire format, the agent and the trainer take them.

Each action is declared once, here: its arguments (type and inclusive bounds, which
``commands.decode`` enforces on both sides of the wire), its ``strength`` (the agent's policy lets a
stronger action through a cooldown that holds back a weaker or equal one, ``agent/policy.py``) and
whether it is ``corrective`` (it changes the run, so the trainer keeps every checkpoint saved before
it from becoming good, ``sentinel/control.py``).  Adding an action is one entry here plus its
handler in the trainer's control loop (docs/architecture.md, "Extending").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Action:
    name: str
    #: argument -> (type, minimum, maximum), bounds inclusive
    args: Mapping[str, tuple[type, float, float]] = field(default_factory=dict)
    #: order of precedence within the policy's cooldown: 0 (warn) ... 5 (stop)
    strength: int = 0
    #: changes the run's trajectory: no checkpoint saved before it may become good afterwards
    corrective: bool = False
    doc: str = ""


TABLE: tuple[Action, ...] = (
    Action("warn", {}, 0, False, "Log the detection; nothing changes."),
    Action("skip_update", {"steps": (int, 1, 10_000)}, 2, True, "Skip the next steps optimizer updates."),
    Action("skip_batches", {"n": (int, 1, 10_000_000)}, 3, True, "Skip the next n batches of data."),
    Action(
        "rollback",
        {"steps_back": (int, 0, 10_000_000), "skip": (int, 0, 10_000_000)},
        4,
        True,
        "Restore the last good checkpoint at least steps_back steps back, then skip that many batches.",
    ),
    Action("lr_scale", {"factor": (float, 1e-6, 1.0)}, 1, True, "Multiply the learning rate by factor."),
    Action("eps_scale", {"factor": (float, 1e-12, 1.0)}, 1, True, "Multiply Adam's epsilon by factor."),
    Action("stop", {}, 5, False, "Stop the run (its last good checkpoint stays the one to resume from)."),
)

BY_NAME: Mapping[str, Action] = MappingProxyType({a.name: a for a in TABLE})
#: action -> {argument: (type, minimum, maximum)}: the wire format's schema
ACTIONS: Mapping[str, Mapping[str, tuple[type, float, float]]] = MappingProxyType(
    {a.name: MappingProxyType(dict(a.args)) for a in TABLE}
)
#: action -> strength, for the agent's policy
STRENGTH: Mapping[str, int] = MappingProxyType({a.name: a.strength for a in TABLE})
#: actions after which no checkpoint saved before them may become good, for the trainer
CORRECTIVE: frozenset[str] = frozenset(a.name for a in TABLE if a.corrective)
