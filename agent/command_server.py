"""The agent's end of the command channel (wire format: agent/commands.py, docs/protocol.md).

A ROUTER socket (``ROUTER_MANDATORY=1``, so a vanished trainer is an error rather than a
silent drop; ``LINGER=0``) bound to ``commands.endpoint``.  Each trainer's rank 0 connects a
DEALER and says ``hello`` with its run name; the server remembers that peer's identity per
run and sends the run's commands to it.  A command stays pending until the trainer
acknowledges its id: it is resent (same id, which the trainer deduplicates) every
``commands.resend_seconds`` and at every new ``hello`` (a restarted trainer), and given up
after ``commands.expire_seconds``.  Sends, acknowledgements, undeliverable and expired
commands are all written to the event log; malformed frames are counted by reason and logged
(rate limited), never fatal.

With ``commands.curve`` set, the socket is a CURVE server and a ZAP authenticator admits only
client keys found in ``authorized_dir``; every refusal is logged with the client's public key.
Without CURVE the channel is unauthenticated, which ``agent.config`` allows on loopback only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from agent.config import CommandsConfig
from agent.events import EventLog
from agent.owners import RunOwners, peer_key
from agent.receive import RateLimiter, clean
from agent.socket_thread import SocketThread
from sentinel_contract.channels import bind_endpoint
from sentinel_contract.commands import Ack, Command, CommandError, Hello, decode

logger = logging.getLogger("sentinel.agent")

REJECT_REASONS = (
    "frame_count",
    "oversized",
    "malformed",
    "unsupported_version",
    "bad_field",
    "bad_args",
    "unknown_action",
    "unexpected_type",
    "unknown_id",
)
MAX_DONE_IDS = 10_000


@dataclass
class _Pending:
    command: Command
    attempts: int = 0
    last_sent: float | None = None
    undeliverable_logged: bool = False


@dataclass
class CommandStats:
    sent: dict[str, int] = field(default_factory=dict)
    resends: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    undeliverable: int = 0
    expired: int = 0
    handshake_failures: int = 0
    refused_keys: int = 0
    pending: int = 0
    connected_runs: int = 0


class CommandServer(SocketThread):
    """Binds the ROUTER socket and delivers commands from its own thread."""

    thread_name = "sentinel-commands"
    channel = "command"

    def __init__(
        self,
        cfg: CommandsConfig,
        events: EventLog,
        *,
        context: zmq.Context | None = None,
        clock=time.time,
        poll_ms: int = 50,
        limiter: RateLimiter | None = None,
        owners: RunOwners | None = None,
    ):
        self.cfg = cfg
        self.curve = cfg.curve  # the agent replaces it with its own keys (agent/autokeys.py)
        self.owners = owners
        self.events = events
        self.clock = clock
        self.poll_ms = poll_ms
        self.limiter = limiter or RateLimiter()
        super().__init__(context)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._peers: dict[str, bytes] = {}
        self._stats = CommandStats()
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def bind(self) -> str:
        """Bind the ROUTER socket (and start the ZAP authenticator with CURVE); raises zmq.ZMQError or OSError."""
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * 64 * 1024)
        endpoint = bind_endpoint(self.cfg.endpoint)
        return self._bind_secured(
            sock, endpoint, self.curve, channel="command", setting="commands.curve.authorized_dir"
        )

    # -- API used by the supervisor (any thread) --------------------------------------------------

    def submit(self, commands: Sequence[Command]) -> None:
        """Queue commands whose decision is already in the event log."""
        for c in commands:
            self._inbox.put(c)

    def restore(self, records: list[dict]) -> None:
        """Pending commands from an events file: decided, neither acknowledged nor expired."""
        commands: dict[str, Command] = {}
        attempts: dict[str, int] = {}
        for rec in records:
            kind = rec.get("type")
            if kind == "decision":
                for c in rec.get("commands") or []:
                    try:
                        commands[c["id"]] = Command(
                            id=c["id"],
                            run=rec["run"],
                            action=c["action"],
                            args=dict(c.get("args") or {}),
                            reason=str(rec.get("reason", ""))[:1000],
                            issued_at=float(rec.get("time", 0.0)),
                        )
                    except (KeyError, TypeError, ValueError):
                        continue
            elif kind == "sent" and rec.get("id") in commands:
                attempts[rec["id"]] = attempts.get(rec["id"], 0) + 1
            elif kind in ("ack", "expired") and rec.get("id") in commands:
                commands.pop(rec["id"])
                self._remember_done(rec["id"])
        with self._lock:
            for cid, cmd in commands.items():
                self._pending[cid] = _Pending(cmd, attempts=attempts.get(cid, 0))
        if commands:
            logger.info("%d unacknowledged command(s) from the event log will be resent", len(commands))

    def snapshot(self) -> CommandStats:
        with self._lock:
            s = self._stats
            return CommandStats(
                dict(s.sent),
                s.resends,
                dict(s.acks),
                dict(s.rejected),
                s.undeliverable,
                s.expired,
                self.handshake_failures,
                self._auth.refused if self._auth is not None else s.refused_keys,
                len(self._pending),
                len(self._peers),
            )

    @property
    def connected_runs(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    # -- the thread ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._take_inbox()
        self._send_due()

    def _drain(self) -> None:
        assert self._sock is not None
        for _ in range(1000):
            try:
                parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            key = peer_key(parts[-1]) if self.owners is not None else None
            frames = [p.bytes for p in parts]
            identity, body = frames[0], frames[1:]
            while len(body) > 1 and body[0] == b"":
                body = body[1:]  # a REQ-style empty delimiter
            if len(body) != 1:
                self._reject("frame_count", f"{len(frames) - 1} frames, expected 1")
                continue
            try:
                msg = decode(body[0])
            except CommandError as exc:
                self._reject(exc.reason if exc.reason in REJECT_REASONS else "malformed", exc.detail)
                continue
            if isinstance(msg, Hello):
                self._hello(identity, msg, key)
            elif isinstance(msg, Ack):
                self._ack(msg, key)
            else:
                self._reject("unexpected_type", "a trainer sent a command; only hello and ack are accepted")

    def _reject(self, reason: str, detail: str) -> None:
        with self._lock:
            self._stats.rejected[reason] += 1
        if self.limiter.allow("cmd_" + reason):
            logger.warning("rejected command-channel frame: reason=%s detail=%s", reason, clean(detail))

    def _hello(self, identity: bytes, hello: Hello, key: str | None = None) -> None:
        if self.owners is not None and not self.owners.admit(hello.run, key, "hello_from_another_key"):
            return  # its commands stay with the run's own key
        with self._lock:
            known = self._peers.get(hello.run)
            self._peers[hello.run] = identity
            for p in self._pending.values():
                if p.command.run == hello.run:
                    p.last_sent, p.undeliverable_logged = None, False  # resend to the (new) peer now
        if known != identity:
            logger.info(
                "trainer of run %s connected for commands (rank %d, step %d)", clean(hello.run), hello.rank, hello.step
            )

    def _ack(self, ack: Ack, key: str | None = None) -> None:
        if not self._ack_allowed(ack, key):
            return
        with self._lock:
            p = self._pending.get(ack.id)
            if p is None:
                duplicate = ack.id in self._done
            else:
                del self._pending[ack.id]
                self._stats.acks[ack.status] = self._stats.acks.get(ack.status, 0) + 1
        if p is None:
            if not duplicate:
                self._reject("unknown_id", f"ack for unknown command id {ack.id!r}")
            return
        self._remember_done(ack.id)
        record = {"type": "ack", "id": ack.id, "run": ack.run, "status": ack.status, "step": ack.step}
        self._log_event({**record, "detail": ack.detail, **({"key": key} if key else {})})
        level = logging.INFO if ack.status in ("applied", "duplicate") else logging.WARNING
        logger.log(level, "command %s (%s) for run %s: %s at step %d %s", ack.id, p.command.action,
                   clean(ack.run), ack.status, ack.step, clean(ack.detail))  # fmt: skip

    def _ack_allowed(self, ack: Ack, key: str | None) -> bool:
        """Only the key that owns a command's run may acknowledge it, and only under that run's name."""
        if self.owners is None:
            return True
        with self._lock:
            p = self._pending.get(ack.id)
            run = p.command.run if p is not None else None
        if run is None:
            return True  # unknown or already acknowledged: nothing to falsify, counted as such
        if ack.run != run:
            self.owners.refuse(
                "ack_for_another_run", f"ack of command {ack.id} names run {clean(ack.run)}, not {clean(run)}"
            )
            return False
        if key is not None and self.owners.owner(run) not in (None, key):
            self.owners.refuse(
                "ack_from_another_key", f"ack of command {ack.id} of run {clean(run)} from CURVE key {key}, "
                f"the run belongs to {self.owners.owner(run)}",
            )  # fmt: skip
            return False
        return True

    def _remember_done(self, cid: str) -> None:
        self._done[cid] = None
        while len(self._done) > MAX_DONE_IDS:
            self._done.popitem(last=False)

    def _take_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                if cmd.id not in self._pending and cmd.id not in self._done:
                    self._pending[cmd.id] = _Pending(cmd)

    def _send_due(self) -> None:
        now = self.clock()
        with self._lock:
            due = [
                p for p in self._pending.values() if p.last_sent is None or now - p.last_sent >= self.cfg.resend_seconds
            ]
        for p in due:
            cmd = p.command
            if cmd.issued_at and now - cmd.issued_at > self.cfg.expire_seconds:
                with self._lock:
                    self._pending.pop(cmd.id, None)
                    self._stats.expired += 1
                self._remember_done(cmd.id)
                logger.error("command %s (%s) for run %s expired unacknowledged after %.0f s", cmd.id, cmd.action,
                             clean(cmd.run), now - cmd.issued_at)  # fmt: skip
                self._log_event({"type": "expired", "id": cmd.id, "run": cmd.run, "action": cmd.action})
                continue
            identity = self._peers.get(cmd.run)
            if identity is None:
                self._undeliverable(p, "no trainer of this run has said hello on the command channel")
                p.last_sent = now  # look again after resend_seconds, or at the run's hello
                continue
            try:
                self._send(identity, cmd)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                with self._lock:
                    if self._peers.get(cmd.run) == identity:
                        del self._peers[cmd.run]
                self._undeliverable(p, "the trainer's connection is gone")
                p.last_sent = now
                continue
            p.attempts += 1
            p.last_sent = now
            with self._lock:
                if p.attempts == 1:
                    self._stats.sent[cmd.action] = self._stats.sent.get(cmd.action, 0) + 1
                else:
                    self._stats.resends += 1
            if p.attempts == 1:
                self._log_event({"type": "sent", "id": cmd.id, "run": cmd.run, "action": cmd.action, "attempt": 1})

    def _send(self, identity: bytes, cmd: Command) -> None:
        """One frame to one peer; the decision is already durable in the event log."""
        assert self._sock is not None
        self._sock.send_multipart([identity, cmd.encode()], flags=zmq.NOBLOCK)

    def _undeliverable(self, p: _Pending, why: str) -> None:
        if p.undeliverable_logged:
            return
        p.undeliverable_logged = True
        cmd = p.command
        logger.warning("command %s (%s) for run %s held: %s", cmd.id, cmd.action, clean(cmd.run), why)
        self._log_event({"type": "undeliverable", "id": cmd.id, "run": cmd.run, "action": cmd.action, "why": why})
        with self._lock:  # counted once its evidence is logged, so a reader of the count finds the record
            self._stats.undeliverable += 1

    def _log_event(self, record: dict) -> None:
        try:
            self.events.append(record)
        except OSError as exc:
            if self.limiter.allow("events"):
                logger.error("cannot write the event log: %s", exc)
