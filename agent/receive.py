"""The receiving end of the statistics channel: a ZeroMQ PULL socket and the thread that drains it.

Whatever a peer sends, the receiver counts it and carries on: a message is either recorded
or rejected with one of ``protocol.REJECT_REASONS`` and one log line.  Log lines are rate
limited per kind, so a flood of bad messages costs a few lines a minute, not the disk.
NaN and Inf values are accepted: they are the clearest sign of a diverging run.

With ``stats_curve`` set the socket is a CURVE server and a ZAP authenticator (agent/keys.py,
in this socket's own ZeroMQ context) admits only the trainer keys in ``authorized_dir``: a
message from another key or from a plain client never reaches this thread.  Failed security
handshakes (a socket monitor) and refused keys are counted and exported (``collect``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import zmq
from prometheus_client.core import CounterMetricFamily, Metric

from agent.config import AgentConfig
from agent.history import PushResult, SeriesKey
from agent.owners import RunOwners, peer_key
from agent.socket_thread import SocketThread
from agent.state import AgentState
from sentinel_contract import protocol
from sentinel_contract.channels import bind_endpoint
from sentinel_contract.protocol import ProtocolError, StatsMessage

logger = logging.getLogger("sentinel.agent")

RCVHWM = 10_000
DRAIN_BATCH = 1000
LOG_DETAIL_CHARS = 300
CURVE_OVERHEAD = 64  # a CURVE MESSAGE adds 33 bytes (command name, nonce, MAC, flags) to each frame on the wire


def clean(text: str, limit: int = LOG_DETAIL_CHARS) -> str:
    """Peer-supplied text made safe for one log line: truncated, non-printables escaped."""
    short = text[:limit]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in short)
    return out + ("..." if len(text) > limit else "")


class RateLimiter:
    """Allows ``burst`` log lines per key per ``window`` seconds, then one summary line.

    Keys must come from a fixed set chosen by the agent (reasons, kinds), never from a peer.
    """

    def __init__(
        self,
        log: logging.Logger = logger,
        *,
        burst: int = 10,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.burst, self.window, self.clock = log, burst, window, clock
        self._state: dict[str, list] = {}  # key -> [window start, lines allowed, lines suppressed]

    def allow(self, key: str) -> bool:
        """True if a line of kind ``key`` may be logged now; counts it either way."""
        now = self.clock()
        st = self._state.get(key)
        if st is None or now - st[0] >= self.window:
            self._summarise(key)
            st = self._state[key] = [now, 0, 0]
        if st[1] < self.burst:
            st[1] += 1
            return True
        st[2] += 1
        return False

    def flush(self) -> None:
        """Write the summary of every window that has ended."""
        now = self.clock()
        for key in [k for k, st in self._state.items() if now - st[0] >= self.window]:
            self._summarise(key)

    def _summarise(self, key: str) -> None:
        st = self._state.pop(key, None)
        if st and st[2]:
            self.log.warning("suppressed %d more %r log lines in the last %.0f s", st[2], key, self.window)


def _nonfinite_names(msg: StatsMessage, limit: int = 5) -> str:
    names = [msg.layout.scalars[i] for i in np.flatnonzero(~np.isfinite(msg.scalars))[:limit]]
    rows, cols = np.nonzero(~np.isfinite(msg.matrix))
    pairs = zip(rows[:limit].tolist(), cols[:limit].tolist(), strict=True)
    names += [f"{msg.layout.tensors[r]}/{msg.layout.stats[c]}" for r, c in pairs]
    return clean(", ".join(names[:limit]), 200)


class Receiver(SocketThread):
    """Binds the PULL socket and records every message into ``state`` from its own thread."""

    thread_name = "sentinel-receiver"
    channel = "statistics"

    def __init__(
        self,
        state: AgentState,
        config: AgentConfig,
        *,
        context: zmq.Context | None = None,
        poll_ms: int = 100,
        limiter: RateLimiter | None = None,
        on_message: Callable[[StatsMessage, PushResult, float], None] | None = None,
        owners: RunOwners | None = None,
    ):
        self.state = state
        self.curve = config.stats_curve  # the agent replaces it with its own keys (agent/autokeys.py)
        self.owners = owners
        self.on_message = on_message
        self.config = config
        self.max_bytes = config.limits.max_message_bytes
        self.max_layouts = config.limits.max_series
        self.poll_ms = poll_ms
        self.limiter = limiter or RateLimiter()
        super().__init__(context)
        self._layouts: dict[str, protocol.Layout] = {}

    @property
    def refused_keys(self) -> int:
        """CURVE client keys the authenticator refused (each a handshake that carried no message)."""
        return self._auth.refused if self._auth is not None else 0

    def bind(self) -> str:
        """Bind the socket (a CURVE server with ``stats_curve``); raises zmq.ZMQError, OSError or ValueError."""
        endpoint = bind_endpoint(self.config.stats_endpoint)
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + CURVE_OVERHEAD)
        return self._bind_secured(
            sock,
            endpoint,
            self.curve,
            channel="statistics",
            setting="stats_curve.authorized_dir",
            allow_log=RateLimiter().allow,
        )

    def collect(self) -> list[Metric]:
        """The statistics channel's security counters, for the agent's registry."""
        return [
            CounterMetricFamily(
                "sentinel_agent_stats_handshake_failures",
                "Connections to the statistics channel that failed the security handshake (connections).",
                value=self.handshake_failures,
            ),
            CounterMetricFamily(
                "sentinel_agent_stats_refused_client_keys",
                "CURVE client keys refused by the statistics channel's authenticator (handshakes).",
                value=self.refused_keys,
            ),
        ]

    def _drain(self) -> None:
        """Handle the queued messages, a batch at a time.

        Frames are read one by one rather than with recv_multipart: ZMQ_MAXMSGSIZE bounds each
        frame but not their number, so only the first four of a message are kept.
        """
        assert self._sock is not None
        for _ in range(DRAIN_BATCH):
            if self._stop.is_set():
                return
            try:
                head = self._sock.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            key = peer_key(head) if self.owners is not None else None
            frames, count = [head.bytes], 1
            while self._sock.getsockopt(zmq.RCVMORE):
                frame = self._sock.recv(copy=True)  # the rest of a multipart message is already here
                count += 1
                if len(frames) < 4:
                    frames.append(frame)
            if count != 3:
                self.reject(ProtocolError("frame_count", f"{count} frames, expected 3"))
                continue
            self.handle(frames, key=key)

    def handle(
        self, frames: Sequence[bytes], received_at: float | None = None, key: str | None = None
    ) -> StatsMessage | None:
        """Decode, check and record one message; returns it, or None if it was rejected.

        ``key``: the sender's CURVE public key; a message for a run another key owns is refused
        (agent/owners.py) before anything is recorded.  Never raises for anything in ``frames``:
        unexpected errors count as ``bad_field``.
        """
        received_at = time.time() if received_at is None else received_at
        try:
            msg = protocol.decode(list(frames), self._layouts, max_bytes=self.max_bytes, max_layouts=self.max_layouts)
            if self.owners is not None and not self.owners.admit(msg.run, key, "statistics_from_another_key"):
                return None
            result = self.state.record_message(msg, received_at)
        except ProtocolError as exc:
            self.reject(exc)
            return None
        except Exception as exc:
            logger.debug("unexpected error while handling a message", exc_info=True)
            self.reject(ProtocolError("bad_field", f"internal error {type(exc).__name__}: {exc}"))
            return None
        if result.nonfinite and self.limiter.allow("nonfinite"):
            logger.warning(
                "non-finite values: run=%s rank=%d step=%d count=%d in %s",
                clean(msg.run),
                msg.rank,
                msg.step,
                result.nonfinite,
                _nonfinite_names(msg),
            )
        if result.evicted is not None:
            self._log_evicted(result.evicted)
        if self.on_message is not None:
            try:
                self.on_message(msg, result, received_at)
            except Exception:  # the message is recorded; a predictor bug must not make it a reject
                if self.limiter.allow("on_message"):
                    logger.exception("error while analysing run=%s step=%d; continuing", clean(msg.run), msg.step)
        if result.scalar_overflow and self.limiter.allow("scalar_overflow"):
            logger.warning(
                "run=%s rank=%d sends more than limits.max_scalar_names=%d other scalar names; the rest are ignored",
                clean(msg.run),
                msg.rank,
                self.config.limits.max_scalar_names,
            )
        return msg

    def reject(self, exc: ProtocolError) -> None:
        """Count a rejected message and log it (rate limited per reason)."""
        self.state.record_reject(exc.reason)
        if self.limiter.allow(exc.reason):
            logger.warning("rejected message: reason=%s detail=%s", exc.reason, clean(exc.detail))

    def _log_evicted(self, key: SeriesKey) -> None:
        if self.limiter.allow("evict"):
            logger.warning(
                "stopped tracking run=%s rank=%d: limits.max_series=%d reached and it was the least recently updated",
                clean(key[0]),
                key[1],
                self.config.limits.max_series,
            )
