"""Wire format of the command channel, version 1 (docs/protocol.md, "Commands").

The actions and their arguments come from ``sentinel_contract.actions``, the one table of them.

The agent decides, the trainer obeys.  The trainer's rank 0 connects a DEALER socket to the
agent's ROUTER socket, says ``hello`` (and again every few seconds, so a restarted agent
learns it back), polls for commands at every step boundary without blocking, and answers
each with an ``ack``.  Command ids are unique; the trainer remembers the ids it has applied
and acknowledges a repeated id as ``duplicate`` without acting again, so the agent may
resend until acknowledged.  One JSON frame per message; nothing is unpickled.

The channel uses CURVE by default (``sentinel_contract.channels``, docs/security.md): the agent
authenticates every client key against a directory of authorised public keys (ZAP), and traffic
is encrypted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from sentinel_contract.actions import ACTIONS

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

ACK_STATUSES = ("applied", "duplicate", "rejected", "unknown_run", "failed")


class CommandError(ValueError):
    """A command-channel message that must be refused; ``reason`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Command:
    id: str
    run: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    issued_at: float = 0.0

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": "command", **self.__dict__})


@dataclass(frozen=True)
class Ack:
    id: str
    run: str
    status: str
    step: int
    detail: str = ""

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": "ack", **self.__dict__})


@dataclass(frozen=True)
class Hello:
    run: str
    rank: int
    step: int

    def encode(self) -> bytes:
        return _dump({"v": VERSION, "type": "hello", **self.__dict__})


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _text(obj: dict, key: str, max_len: int = 256, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_len or (not value and not allow_empty):
        raise CommandError("bad_field", f"{key} must be a string of at most {max_len} characters")
    return value


def _int(obj: dict, key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or not 0 <= value < 2**63:
        raise CommandError("bad_field", f"{key} must be an integer in [0, 2^63)")
    return value


def _args(action: str, args: object) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise CommandError("bad_field", "args must be an object")
    spec = ACTIONS[action]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise CommandError("bad_args", f"{action} takes no argument {unknown[0]!r}; allowed: {sorted(spec)}")
    out = {}
    for name, (kind, lo, hi) in spec.items():
        if name not in args:
            raise CommandError("bad_args", f"{action} needs {name}")
        value = args[name]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind or (kind is float and not math.isfinite(value)) or not lo <= value <= hi:
            raise CommandError("bad_args", f"{action}.{name}={value!r}; allowed: {kind.__name__} in [{lo}, {hi}]")
        out[name] = value
    return out


def decode(raw: bytes) -> Command | Ack | Hello:
    """Validate one command-channel frame; raise CommandError otherwise."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise CommandError("oversized", f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CommandError("malformed", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise CommandError("malformed", "not a JSON object")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise CommandError("unsupported_version", f"v={str(obj.get('v'))[:20]}, this side speaks {VERSION}")
    kind = obj.get("type")
    if kind == "hello":
        return Hello(run=_text(obj, "run", 128), rank=_int(obj, "rank"), step=_int(obj, "step"))
    if kind == "ack":
        status = obj.get("status")
        if status not in ACK_STATUSES:
            raise CommandError("bad_field", f"status must be one of {ACK_STATUSES}")
        return Ack(
            id=_text(obj, "id", 64),
            run=_text(obj, "run", 128),
            status=status,
            step=_int(obj, "step"),
            detail=_text(obj, "detail", 1000, allow_empty=True),
        )
    if kind == "command":
        action = obj.get("action")
        if not isinstance(action, str) or action not in ACTIONS:  # a list or object is not hashable
            raise CommandError("unknown_action", f"action must be one of {sorted(ACTIONS)}")
        issued = obj.get("issued_at", 0.0)
        if not isinstance(issued, (int, float)) or isinstance(issued, bool) or not math.isfinite(issued):
            raise CommandError("bad_field", "issued_at must be a finite number")
        return Command(
            id=_text(obj, "id", 64),
            run=_text(obj, "run", 128),
            action=action,
            args=_args(action, obj.get("args", {})),
            reason=_text(obj, "reason", 1000, allow_empty=True),
            issued_at=float(issued),
        )
    raise CommandError("malformed", "type must be hello, ack or command")
