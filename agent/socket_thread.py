"""A ZeroMQ socket drained by a thread of its own: the lifecycle the receiver and the command server share.

Subclasses bind the socket (``bind``), run the loop (``_run``, returning once ``_stop`` is set)
and release what else they hold (``_release``).  ``stop`` is safe to call twice and never
closes a socket its thread may still be using.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import zmq

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

    def _release(self) -> None:
        """Close what the subclass holds besides its socket (monitors, authenticators)."""

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
