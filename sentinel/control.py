"""The trainer's side of the command channel: the agent decides, the trainer obeys, at a step boundary.

Why it looks like this:
- Only rank 0 talks to the agent, over a ZeroMQ DEALER (``LINGER=0``, ``IMMEDIATE``, every
  send and receive ``NOBLOCK``), so a missing, slow or dead agent costs a failed non-blocking
  call per step and nothing more.  It says ``hello`` when it can and every ``hello_interval``
  seconds after, so a restarted agent learns the run back.
- Commands are validated with ``agent.commands.decode``.  Rank 0 answers commands for another
  run (``unknown_run``), ids it has already handled (``duplicate``; the ids are remembered,
  bounded, in sentinel's state_dict) and invalid messages (``rejected``) itself.  What remains
  is broadcast to every rank as JSON bytes in a uint8 tensor (no pickle), and every rank
  applies it at the same step; the outcome is agreed with one all-reduce and rank 0 acks it.
- Applying a command never raises into the training loop: a failure is logged and acked
  ``failed``.  Every action is logged with the command's ``reason`` as its evidence.

Actions: ``warn`` (log), ``skip_update(steps)`` (``Sentinel.skip_updates``), ``skip_batches(n)``
(advance the data position), ``rollback(steps_back, skip)`` (restore the newest good checkpoint
at step <= current - steps_back, then skip ``skip`` batches), ``lr_scale(factor)`` (every param
group and the LR scheduler; see :func:`scale_lr`), ``eps_scale(factor)`` (every param group's Adam ε;
:func:`scale_eps`), ``stop`` (``sn.should_stop``; ``sn.batches()``
ends).  A rollback asking further back than this run's checkpoints go (early in a run) restores the
oldest good one and says so in its ack.  This object also runs the step boundary: commands first,
then checkpoint bookkeeping.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import zmq
import zmq.auth

from sentinel import collectives
from sentinel import curve as _curve
from sentinel.checkpoint import CheckpointError
from sentinel_contract.actions import CORRECTIVE  # no checkpoint saved before one may become good
from sentinel_contract.commands import MAX_MESSAGE_BYTES, Ack, Command, CommandError, Hello, decode

if TYPE_CHECKING:
    from sentinel.attach import Sentinel
    from sentinel.config import ControlConfig, CurveConfig

log = logging.getLogger("sentinel")

_RANK = {"failed": 0, "rejected": 1, "applied": 2}  # the all-reduced outcome is the worst rank's


class ControlClient:
    """Rank 0's DEALER socket to the agent's command endpoint; every call returns at once."""

    def __init__(
        self,
        endpoint: str,
        run: str,
        hello_interval: float = 5.0,
        curve: CurveConfig | None = None,
        insecure: bool = False,
    ):
        """Keys from ``curve``, else discovered (sentinel/curve.py ``Security``), or none with ``insecure``."""
        self.run, self.endpoint, self.hello_interval = run, endpoint, hello_interval
        self.received = self.invalid = self.acks_dropped = self.hellos = 0
        self._next_hello = 0.0
        self.security = _curve.Security("control", endpoint, curve, insecure, what="commands")
        self._ctx = zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if not self.security.ready:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.setsockopt(zmq.RCVHWM, 100)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
        self.security.apply(sock)
        sock.connect(self.endpoint)
        self._sock = sock
        self._next_hello = 0.0  # a new connection says hello at once

    def receive(self, limit: int = 32) -> list[Command]:
        """Commands waiting now (validated), at most ``limit``; invalid messages are answered and counted."""
        out: list[Command] = []
        if self.security.poll():
            self._open()
        if self._sock is None:
            return out
        for _ in range(limit):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            raw = frames[-1]
            try:
                msg = decode(raw)
            except CommandError as exc:
                self.invalid += 1
                if self.invalid <= 10 or self.invalid % 1000 == 0:
                    log.warning("sentinel: invalid command message (%d so far): %s", self.invalid, exc)
                self._answer_invalid(raw, exc)
                continue
            if isinstance(msg, Command):
                self.received += 1
                out.append(msg)
        return out

    def _answer_invalid(self, raw: bytes, exc: CommandError) -> None:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        cid, run = (obj.get("id"), obj.get("run")) if isinstance(obj, dict) else (None, None)
        if isinstance(cid, str) and isinstance(run, str) and 0 < len(cid) <= 64 and 0 < len(run) <= 128:
            self.ack(Ack(id=cid, run=run, status="rejected", step=0, detail=str(exc)[:1000]))

    def ack(self, ack: Ack) -> bool:
        return self._send(ack.encode(), count_drop=True)

    def hello(self, step: int, force: bool = False) -> None:
        """Say hello if it is time (retried every 0.5 s until one goes out)."""
        now = time.monotonic()
        if not force and now < self._next_hello:
            return
        ok = self._send(Hello(run=self.run, rank=0, step=step).encode())
        self.hellos += ok
        self._next_hello = now + (self.hello_interval if ok else min(0.5, self.hello_interval))

    def _send(self, data: bytes, count_drop: bool = False) -> bool:
        try:
            if self._sock is None:
                raise zmq.Again
            self._sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.acks_dropped += count_drop
            return False
        except zmq.ZMQError as exc:
            log.warning("sentinel: command channel send failed: %s", exc)
            self.acks_dropped += count_drop
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()


def check_endpoint(config: ControlConfig) -> None:
    """Refuse a command endpoint off this host without CURVE: commands can roll back or stop the run."""
    _curve.check_endpoint("control", config, "anyone who can reach it could roll back or stop this run")


class Control:
    """Runs the step boundary on every rank: receive (rank 0), broadcast, apply, acknowledge."""

    def __init__(self, sn: Sentinel, config: ControlConfig):
        self.sn, self.config = sn, config
        self.rank = collectives.rank()
        self.handled: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (status, step)
        self.lr_factor = 1.0
        self.eps_factor = 1.0
        self.applied = self.failed = self.rejected = self.duplicates = self.unknown_run = 0
        self.client: ControlClient | None = None
        if config.enabled and collectives.active():
            collectives.cpu_group()  # created here, on every rank, in the same order
        if config.enabled and self.rank == 0:
            self.client = ControlClient(
                config.endpoint, sn.run, config.hello_interval, config.curve, insecure=config.insecure
            )
            self.client.hello(sn.step, force=True)
            log.info("sentinel: taking commands for run %r from %s", sn.run, config.endpoint)

    # ---- the step boundary ----

    def boundary(self, loss: Any = None, grad_norm: Any = None) -> None:
        """Called by ``observe()`` after the step counter advanced. Never raises."""
        ckpt = self.sn.checkpoints
        try:
            if ckpt is not None:
                ckpt.note(loss, grad_norm)
            if self.config.enabled and self.sn.step % self.config.every == 0:
                for cmd in self._exchange():
                    self._run(cmd)
        except Exception:
            self.sn.errors += 1
            log.exception("sentinel: command handling failed at step %d (training continues)", self.sn.step)
        if ckpt is not None:
            try:
                ckpt.step_end(self.sn.step)
            except Exception:
                self.sn.errors += 1
                log.exception("sentinel: checkpointing failed at step %d (training continues)", self.sn.step)

    def _exchange(self) -> list[Command]:
        """Rank 0 receives and filters; every rank gets the same validated commands."""
        cmds: list[Command] = []
        if self.client is not None:
            self.client.hello(self.sn.step)
            cmds = self._admit(self.client.receive())
        if not collectives.active():
            return cmds
        payload = json.dumps([c.encode().decode() for c in cmds]).encode() if cmds else None
        raw = collectives.broadcast_bytes(payload)
        if self.rank == 0 or not raw:
            return cmds
        out = []
        for text in json.loads(raw):
            msg = decode(text.encode())
            if isinstance(msg, Command):
                out.append(msg)
        return out

    def _admit(self, cmds: list[Command]) -> list[Command]:
        out: list[Command] = []
        seen: set[str] = set()
        for cmd in cmds:
            if cmd.run != self.sn.run:
                self.unknown_run += 1
                log.warning("sentinel: command %s is for run %r, this is %r: ignored", cmd.id, cmd.run, self.sn.run)
                self._ack(cmd, "unknown_run", f"this trainer runs {self.sn.run!r}")
            elif cmd.id in seen:
                self.duplicates += 1  # a resend in the same batch: the first copy's ack answers both
            elif cmd.id in self.handled:
                self.duplicates += 1
                status, step = self.handled.get(cmd.id, ("pending", self.sn.step))
                log.info(
                    "sentinel: command %s already handled (%s at step %d); not applied again", cmd.id, status, step
                )
                self._ack(cmd, "duplicate", f"first handled at step {step}: {status}")
            else:
                seen.add(cmd.id)
                out.append(cmd)
        return out

    def _ack(self, cmd: Command, status: str, detail: str, step: int | None = None) -> None:
        if self.client is not None:
            step = self.sn.step if step is None else step
            self.client.ack(Ack(id=cmd.id, run=cmd.run, status=status, step=step, detail=detail[:1000]))

    # ---- applying ----

    def apply(self, cmd: Command) -> Ack:
        """Apply ``cmd`` now and return its acknowledgement (also sent to the agent from rank 0).

        For programmatic use (tests, scripted recovery): under torch.distributed, call it on
        every rank at the same step, as the command channel does.
        """
        if cmd.id in self.handled:
            status, step = self.handled[cmd.id]
            return Ack(id=cmd.id, run=cmd.run, status="duplicate", step=self.sn.step, detail=f"first at step {step}")
        return self._run(cmd)

    def _run(self, cmd: Command) -> Ack:
        step = self.sn.step
        args = ", ".join(f"{k}={v}" for k, v in cmd.args.items())
        log.warning(
            "sentinel: command %s at step %d: %s(%s); evidence: %s", cmd.id, step, cmd.action, args, cmd.reason or "-"
        )
        try:
            status, detail = self._apply(cmd)
        except CheckpointError as exc:
            status, detail = "failed", str(exc)
        except Exception as exc:
            log.exception("sentinel: command %s (%s) failed at step %d", cmd.id, cmd.action, step)
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
        worst = collectives.all_min([_RANK[status]])[0]
        if worst != _RANK[status]:
            status = next(k for k, v in _RANK.items() if v == worst)
            detail = f"{status} on another rank; here: {detail}"
        self.handled[cmd.id] = (status, step)
        while len(self.handled) > self.config.remember:
            self.handled.popitem(last=False)
        setattr(self, status, getattr(self, status) + 1)
        level = logging.WARNING if status == "applied" else logging.ERROR
        log.log(level, "sentinel: command %s %s: %s", cmd.id, status, detail)
        events = getattr(self.sn, "events", None)
        if isinstance(events, list):
            events.append(
                {
                    "action": cmd.action,
                    "step": step,
                    "id": cmd.id,
                    "status": status,
                    "detail": detail,
                    "reason": cmd.reason,
                    "args": dict(cmd.args),
                }
            )
        ack = Ack(id=cmd.id, run=cmd.run, status=status, step=step, detail=detail[:1000])
        if self.client is not None:
            self.client.ack(ack)
        return ack

    def _apply(self, cmd: Command) -> tuple[str, str]:
        ckpt = self.sn.checkpoints
        if cmd.action in CORRECTIVE and ckpt is not None:
            ckpt.taint(f"{cmd.action} command {cmd.id}: {cmd.reason or 'no reason given'}")
        handler = HANDLERS.get(cmd.action)
        if handler is None:
            return "rejected", f"unknown action {cmd.action!r}"
        return handler(self, cmd)

    # ---- one handler per action of sentinel_contract.actions.TABLE, listed in HANDLERS ----

    def _warn(self, cmd: Command) -> tuple[str, str]:
        return "applied", "logged"

    def _skip_update(self, cmd: Command) -> tuple[str, str]:
        if getattr(self.sn, "guard", True) is None:
            return "rejected", "sentinel is disabled: no optimizer hooks to skip updates with"
        steps = cmd.args["steps"]
        self.sn.skip_updates(steps, reason=f"agent command {cmd.id}: {cmd.reason or 'no reason given'}")
        return "applied", f"skipping the next {steps} update(s)"

    def _skip_batches(self, cmd: Command) -> tuple[str, str]:
        position = self.sn.position
        position.skip(cmd.args["n"], reason=f"agent command {cmd.id}: {cmd.reason or 'no reason given'}")
        return "applied", f"data position now epoch {position.epoch} index {position.index}"

    def _lr_scale(self, cmd: Command) -> tuple[str, str]:
        factor = cmd.args["factor"]
        scale_lr(self.sn.optimizer, self.sn.lr_scheduler, factor)
        self.lr_factor *= factor
        return "applied", f"learning rates x{factor:g} (cumulative x{self.lr_factor:g})"

    def _eps_scale(self, cmd: Command) -> tuple[str, str]:
        factor = cmd.args["factor"]
        scale_eps(self.sn.optimizer, factor)
        self.eps_factor *= factor
        return "applied", f"Adam ε x{factor:g} in every param group (cumulative x{self.eps_factor:g})"

    def _stop(self, cmd: Command) -> tuple[str, str]:
        if self.sn.checkpoints is not None:
            self.sn.checkpoints.wait()
        self.sn.position.stop()
        return "applied", "sn.should_stop is set; sn.batches() ends at its next batch"

    def _rollback_command(self, cmd: Command) -> tuple[str, str]:
        return self._rollback(cmd.args["steps_back"], cmd.args["skip"], cmd)

    def _rollback(self, steps_back: int, skip: int, cmd: Command) -> tuple[str, str]:
        ckpt = self.sn.checkpoints
        if ckpt is None:
            return "rejected", "checkpointing is off (checkpoint.dir is null): nothing to roll back to"
        start = self.sn.step
        limit = start - steps_back
        path = ckpt.latest_good(limit) if limit >= 0 else None
        short = ""
        if path is None:  # early in a run: as far back as this run's checkpoints go
            path = ckpt.latest_good(start - 1, oldest=True) if start >= 1 else None
            if path is None:
                return "failed", f"no good checkpoint at step <= {limit}, nor any earlier than step {start}"
            short = f"no good checkpoint at step <= {limit}: the oldest good one instead; "
        restored = ckpt.restore(path)
        if skip:
            self.sn.position.skip(skip, reason=f"rollback command {cmd.id}: {cmd.reason or 'no reason given'}")
        return "applied", (
            f"{short}rolled back from step {start} to {path.name}; skipped {skip} batch(es); data position "
            f"epoch {self.sn.position.epoch} index {self.sn.position.index}; now at step {restored}"
        )

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        return {
            "handled": [[k, s, n] for k, (s, n) in self.handled.items()],
            "lr_factor": self.lr_factor,
            "eps_factor": self.eps_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.handled = OrderedDict((str(k), (str(s), int(n))) for k, s, n in state.get("handled", []))
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.eps_factor = float(state.get("eps_factor", 1.0))

    def after_restore(self, live: dict[str, Any]) -> None:
        """After a checkpoint restore: keep the live command history and LR factor, not the checkpoint's."""
        saved_factor, saved_eps = self.lr_factor, self.eps_factor
        self.load_state_dict(live)
        if self.lr_factor != saved_factor and saved_factor > 0:
            scale_lr(self.sn.optimizer, self.sn.lr_scheduler, self.lr_factor / saved_factor)
        if self.eps_factor != saved_eps and saved_eps > 0:
            scale_eps(self.sn.optimizer, self.eps_factor / saved_eps)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def scale_eps(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every param group's ``eps`` by ``factor`` (the agent only ever lowers it: Wortsman et al.,
    arXiv:2309.14322, §3.4: ε 1e-15 cures the ε-stall, a larger ε diverges)."""
    for group in optimizer.param_groups:
        value = group.get("eps")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            group["eps"] = value * factor


LR_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
LR_SCHEDULER_ATTRS = ("base_lrs", "max_lrs", "_last_lr")


def scale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply every learning rate by ``factor``, where schedulers will keep reading it.

    Param groups: ``lr``, ``initial_lr``, ``max_lr``, ``min_lr`` (OneCycleLR's keys).  The
    scheduler (and those a SequentialLR/ChainedScheduler holds): ``base_lrs``, ``max_lrs``
    (CyclicLR), ``_last_lr``.  Closed-form schedules (cosine, linear, step) then continue at
    ``factor`` times their old values; scalar floors such as ``eta_min`` are left alone.
    """
    for group in optimizer.param_groups:
        for key in LR_GROUP_KEYS:
            value = group.get(key)
            if isinstance(value, torch.Tensor):
                value.mul_(factor)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                group[key] = value * factor
    _scale_scheduler(scheduler, factor, set())


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    if scheduler is None or id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for attr in LR_SCHEDULER_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(
                scheduler,
                attr,
                [v.mul(factor) if isinstance(v, torch.Tensor) else v * factor for v in values],
            )
    for sub in getattr(scheduler, "_schedulers", None) or ():
        _scale_scheduler(sub, factor, seen)


#: the trainer's handler of each command action (sentinel_contract.actions.TABLE declares the actions;
#: a test checks that the two list the same names)
HANDLERS = {
    "warn": Control._warn,
    "skip_update": Control._skip_update,
    "skip_batches": Control._skip_batches,
    "lr_scale": Control._lr_scale,
    "eps_scale": Control._eps_scale,
    "stop": Control._stop,
    "rollback": Control._rollback_command,
}
