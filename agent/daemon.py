"""The agent process in one object: state, receiver thread and /metrics server.

``Agent`` is what the CLI runs and what a test or an embedding program can start in-process:
``start()`` binds both listeners (so their real addresses are known, even with port 0),
``stop()`` releases them; both are safe to call in any order and more than once.
"""

from __future__ import annotations

import logging
import threading

import zmq
from prometheus_client import start_http_server

from agent.config import AgentConfig, load_config
from agent.metrics import make_registry
from agent.receive import Receiver
from agent.state import AgentState

logger = logging.getLogger("sentinel.agent")


class AgentStartError(RuntimeError):
    """A listener could not be opened (address in use, permission, bad certificate...)."""


class Agent:
    """Receives trainer statistics and serves them as Prometheus metrics."""

    def __init__(self, config: AgentConfig | dict | None = None):
        self.config = load_config(config)
        self.state = AgentState(self.config)
        self.registry = make_registry(self.state, self.config)
        self.receiver = Receiver(self.state, self.config)
        self._server = None
        self._server_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = False
        self._listening = False
        self._stopped = False

    @property
    def stats_endpoint(self) -> str:
        """The bound ZeroMQ endpoint, with the actual port."""
        if self.receiver.endpoint is None:
            raise RuntimeError("agent not started")
        return self.receiver.endpoint

    @property
    def metrics_port(self) -> int:
        if self._server is None:
            raise RuntimeError("agent not started")
        return int(self._server.server_port)

    @property
    def metrics_url(self) -> str:
        """``http(s)://HOST:PORT/metrics`` with the actual port."""
        host = self.config.metrics.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "https" if self.config.metrics.certfile else "http"
        return f"{scheme}://{host}:{self.metrics_port}/metrics"

    @property
    def healthy(self) -> bool:
        """True while both the receiver and the HTTP server threads run."""
        return bool(
            self._started
            and not self._stopped
            and self.receiver.alive
            and self._server_thread is not None
            and self._server_thread.is_alive()
        )

    def start(self) -> Agent:
        """Open both listeners and start serving; raises AgentStartError if one cannot be opened."""
        with self._lock:
            if self._started:
                return self
            if self._stopped:
                raise RuntimeError("a stopped agent cannot be restarted; create a new one")
            self._started = True
        try:
            try:
                self.receiver.bind()
            except zmq.ZMQError as exc:
                endpoint = self.config.stats_endpoint
                raise AgentStartError(f"cannot bind stats endpoint {endpoint}: {exc}") from exc
            m = self.config.metrics
            try:
                self._server, self._server_thread = start_http_server(
                    m.port, addr=m.host, registry=self.registry, certfile=m.certfile, keyfile=m.keyfile
                )
            except (OSError, ValueError) as exc:
                raise AgentStartError(f"cannot serve metrics on {m.host}:{m.port}: {exc}") from exc
            self.receiver.start()
        except BaseException:
            self.stop()
            raise
        self._listening = True
        logger.info("sentinel agent listening: stats=%s metrics=%s", self.stats_endpoint, self.metrics_url)
        return self

    def stop(self) -> None:
        """Stop the receiver, close the socket and shut the HTTP server down; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.receiver.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._server_thread is not None:
            self._server_thread.join(5.0)
        if self._listening:
            logger.info("sentinel agent stopped")

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
