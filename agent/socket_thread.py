"""A ZeroMQ socket drained by a thread of its own: the lifecycle the receiver and the command server share.

Subclasses bind the socket (``bind``, usually through ``_bind_secured``: CURVE when configured,
and a monitor for failed handshakes) and run the loop (``_run``, returning once ``_stop`` is
set).  ``stop`` is safe to call twice and never closes a socket its thread may still be using.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import zmq

from agent.keys import HANDSHAKE_EVENTS, CurveAuthenticator, load_secret

logger = logging.getLogger("sentinel.agent")


class SocketThread:
    thread_name = "sentinel-socket"

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

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint with the actual port (ZMQ_LAST_ENDPOINT), None before bind()."""
        return self._endpoint

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def bind(self) -> str:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError

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
