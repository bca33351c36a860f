"""A ZeroMQ socket drained by a thread of its own: the lifecycle the receiver and the command server share.

Subclasses bind the socket (``bind``, usually through ``_bind_secured``: CURVE when configured,
and a monitor for failed handshakes), read what arrived (``_drain``) and may do periodic work
(``_tick``); the loop itself, the handshake-failure count and its log lines are shared.  They
set ``limiter`` (agent.receive.RateLimiter) and ``channel`` (words the log lines).  ``stop`` is
safe to call twice and never closes a socket its thread may still be using.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import zmq

from agent.keys import HANDSHAKE_EVENTS, CurveAuthenticator, failed_handshakes, load_secret

logger = logging.getLogger("sentinel.agent")


class SocketThread:
    thread_name = "sentinel-socket"
    channel = "socket"
    limiter: Any

    def __init__(self, context: zmq.Context | None):
        self._own_context = context is None
        self._context = context
        self._sock: zmq.Socket | None = None
        self._endpoint: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._monitor: zmq.Socket | None = None
        self._auth: CurveAuthenticator | None = None
        self.handshake_failures = 0

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint with the actual port (ZMQ_LAST_ENDPOINT), None before bind()."""
        return self._endpoint

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def bind(self) -> str:
        raise NotImplementedError

    def _drain(self) -> None:
        """Read what is waiting on the socket, without blocking."""
        raise NotImplementedError

    def _tick(self) -> None:
        """Periodic work after each poll (at least every ``poll_ms``)."""

    def _run(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(self.poll_ms))
                if self._monitor is not None and self._monitor in ready:
                    self._drain_monitor()
                if self._sock in ready:
                    self._drain()
                self._tick()
                self.limiter.flush()
            except zmq.ContextTerminated:
                break
            except Exception:
                if self.limiter.allow(self.thread_name):
                    logger.exception("%s loop error; continuing", self.thread_name)
                time.sleep(0.1)

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        for text, code in failed_handshakes(self._monitor):
            self.handshake_failures += 1
            if self.limiter.allow("handshake"):
                logger.warning("%s channel: %s (code %s)", self.channel, text, code)

    def _bind_secured(self, sock: zmq.Socket, endpoint: str, curve: Any, **auth: Any) -> str:
        """Bind ``sock``: a CURVE server admitting ``curve.authorized_dir`` when ``curve.secret_file``
        is set (``auth`` words the authenticator's log lines), and always a handshake monitor.
        On failure everything is released and the socket closed; returns the bound endpoint."""
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if curve.secret_file:
                public, secret = load_secret(curve.secret_file)
                self._auth = CurveAuthenticator(self._context, **auth).start_for(str(curve.authorized_dir))
                sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
            self._monitor = sock.get_monitor_socket(sum(HANDSHAKE_EVENTS))
            sock.bind(endpoint)
        except (zmq.ZMQError, OSError, ValueError):
            self._release()
            sock.close(linger=0)
            raise
        self._sock = sock
        self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self._endpoint

    def _release(self) -> None:
        """Close the monitor and stop the authenticator."""
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def start(self) -> None:
        """Start the thread (binds first if needed)."""
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the socket; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("%s thread did not stop within %.1f s", self.thread_name, timeout)
                return
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._sock.close(linger=0)
        self._release()
        if self._own_context and self._context is not None:
            self._context.term()
