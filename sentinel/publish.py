"""Send statistics to the agent without ever making the training step wait.

ZeroMQ PUSH with ``IMMEDIATE`` (queue only to connected peers), a bounded send queue
(``SNDHWM``) and ``NOBLOCK``: when the agent is absent, dead or slower than the trainer,
``send`` raises ``zmq.Again`` at once and the message is counted as dropped.  Reconnection
after an agent restart is ZeroMQ's own.

The TCP connection takes a moment to settle after ``connect``, and the first messages of a run
leave within that moment.  Until the socket monitor reports the handshake done or the
connection refused (``SETTLE_SECONDS`` at most), a refused message is held (at most ``queue``
of them, in order) and sent with the next one; only after that is a refusal a drop, and only
then does the "agent not reachable" warning mean it.  ``close`` gives
held and queued messages a bounded moment (``CLOSE_SECONDS``) to leave, so the counters a
short run reports after ``close()`` are what the agent got.

The socket is a CURVE client (docs/security.md): keys from ``publish.curve``, or from the local
agent's discovery file (sentinel/curve.py ``Security``), unless ``publish.insecure``.  Until keys
are found there is no socket, and later keys (an agent restarted with new ones) rebuild it.  A
refused handshake (wrong key, an impostor without the agent's secret) leaves the socket with no
connected peer, so with ``IMMEDIATE`` every message is dropped and counted at once, exactly as
with no agent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from sentinel import curve as _curve
from sentinel_contract import protocol

if TYPE_CHECKING:
    from sentinel.config import PublishConfig, PublishCurveConfig

log = logging.getLogger("sentinel")
SETTLE_SECONDS = 2.0
CLOSE_SECONDS = 1.0
_SETTLED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
)


def check_endpoint(config: PublishConfig) -> None:
    """Refuse a statistics endpoint off this host without CURVE, unless explicitly allowed."""
    _curve.check_endpoint("publish", config, "the statistics would travel unauthenticated and in clear")


class Publisher:
    def __init__(
        self,
        endpoint: str,
        run: str,
        rank: int,
        queue: int = 1000,
        curve: PublishCurveConfig | None = None,
        insecure: bool = False,
    ):
        """``curve``: the trainer's key pair and the agent's public key (raises ConfigError if unreadable);
        without it the discovered keys, or none with ``insecure``."""
        self.security = _curve.Security("publish", endpoint, curve, insecure, what="statistics")
        self.endpoint, self.queue = endpoint, queue
        self.run, self.rank = run, rank
        self.sent = 0
        self.dropped = 0
        self._seq = 0
        self._layouts: dict[protocol.Layout, tuple[bytes, str]] = {}
        self._ctx = zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._connected_at = 0.0
        self._held: deque[list[bytes]] = deque()
        self._open()
        self._warned = False

    def _open(self) -> None:
        self._stop_monitor()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if not self.security.ready:
            return
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.queue)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        self.security.apply(sock)
        self._monitor = sock.get_monitor_socket(_SETTLED)
        sock.connect(self.endpoint)
        self._connected_at = time.monotonic()
        self._sock = sock

    def publish(self, step: int, layout: protocol.Layout, data: np.ndarray) -> bool:
        """Queue one message; returns False (and counts a drop) if it cannot be queued now."""
        if layout not in self._layouts:
            raw = layout.encode()
            self._layouts[layout] = (raw, protocol.layout_id(raw))
        raw, lid = self._layouts[layout]
        if self.security.poll():
            self._open()
        self._seq += 1
        header = protocol.encode_header(
            run=self.run,
            rank=self.rank,
            step=step,
            time=time.time(),
            seq=self._seq,
            sent=self.sent + 1,
            dropped=self.dropped,
            layout=lid,
        )
        frames = [header, raw, data.astype(protocol.DTYPE, copy=False).tobytes()]
        if self._held and not self._flush_held():
            return self._refused(frames)
        try:
            if self._sock is None:
                raise zmq.Again
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return self._refused(frames)
        if self._monitor is not None:
            self._stop_monitor()
        self.sent += 1
        self._warned = False
        return True

    def _settling(self) -> bool:
        """True while the first connection has neither carried a message nor failed.

        A handshake reported done does not end the window: the socket attaches the new peer
        only when it next processes its commands, so a send just after the event may still be
        refused.  The window ends with the first message sent, a failure, or ``SETTLE_SECONDS``.
        """
        if self._monitor is None:
            return False
        if time.monotonic() - self._connected_at >= SETTLE_SECONDS:
            self._stop_monitor()
            return False
        while self._monitor.poll(0):
            if recv_monitor_message(self._monitor)["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._stop_monitor()
                return False
        return True

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            if self._sock is not None:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _refused(self, frames: list[bytes]) -> bool:
        if self._settling() and len(self._held) < self.queue:
            self._held.append(frames)
            return True
        self.dropped += 1 + len(self._held)
        self._held.clear()
        if not self._warned:
            log.warning("sentinel: agent not reachable; dropping statistics (counted) until it is")
            self._warned = True
        return False

    def _flush_held(self) -> bool:
        """Send the held messages in order; True once none is left."""
        while self._held:
            if self._sock is None:
                return False
            try:
                self._sock.send_multipart(self._held[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            self._held.popleft()
            self.sent += 1
        return True

    def close(self) -> None:
        """Give held and queued messages up to ``CLOSE_SECONDS`` to leave, then close."""
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._sock is not None and self._held and not self._flush_held() and time.monotonic() < deadline:
            self._sock.poll(50, zmq.POLLOUT)
        self.dropped += len(self._held)
        self._held.clear()
        self._stop_monitor()
        if self._sock is not None:
            self._sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)) if self.sent else 0)
            self._sock = None
        self._ctx.term()


class HostTransfer:
    """One device→host copy per publish; on CUDA it never stalls the step.

    CUDA: the packed tensor is copied into a pinned buffer with ``non_blocking=True`` and an
    event is recorded; the host reads it on a later call once the event has completed, so a
    message may go out one step late.  CPU: the tensor is already on the host.
    """

    def __init__(self):
        self._pending: list[tuple[torch.cuda.Event, torch.Tensor, object]] = []

    def submit(self, packed: torch.Tensor, tag: object) -> list[tuple[np.ndarray, object]]:
        if packed.device.type != "cuda":
            return self.ready() + [(packed.detach().float().numpy(), tag)]
        buf = torch.empty(packed.shape, dtype=torch.float32, pin_memory=True)
        buf.copy_(packed.detach().float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, buf, tag))
        return self.ready()

    def ready(self, wait: bool = False) -> list[tuple[np.ndarray, object]]:
        out = []
        while self._pending and (wait or self._pending[0][0].query()):
            event, buf, tag = self._pending.pop(0)
            event.synchronize()
            out.append((buf.numpy(), tag))
        return out
