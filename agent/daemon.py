"""The agent process in one object: state, receiver, supervisor, command server and HTTP server.

``Agent`` is what the CLI runs and what a test or an embedding program can start in-process:
``start()`` opens the event log (reading back earlier decisions) and binds every listener (so
their real addresses are known, even with port 0); ``stop()`` releases them; both are safe to
call in any order and more than once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import zmq

from agent import __version__
from agent.autokeys import AutoKeys, Discovery, ensure_keys
from agent.command_server import CommandServer
from agent.config import AgentConfig, CurveConfig, load_config, state_path
from agent.events import EventLog
from agent.history import PushResult
from agent.http import HTTPService, make_app
from agent.metrics import make_registry
from agent.owners import RunOwners
from agent.receive import Receiver
from agent.recording import StatsRecorder
from agent.state import AgentState
from agent.status_page import StatusBoard, render_page
from agent.supervisor import Supervisor
from agent.warm import warm_start
from sentinel_contract.protocol import StatsMessage

logger = logging.getLogger("sentinel.agent")


class AgentStartError(RuntimeError):
    """A listener or file could not be opened (address in use, permission, bad certificate...)."""


class Agent:
    """Receives trainer statistics, acts on them, and serves them as Prometheus metrics."""

    def __init__(self, config: AgentConfig | dict | None = None):
        self.config = cfg = load_config(config)
        self.state = AgentState(cfg)
        self.events = EventLog(state_path(cfg, cfg.events.path, "events.jsonl"))
        self.owners = RunOwners()
        self.keys: AutoKeys | None = None
        self.discovery = Discovery(cfg.security.discovery_dir)
        self.commands = CommandServer(cfg.commands, self.events, owners=self.owners) if cfg.commands.enabled else None
        self.supervisor = Supervisor(cfg, self.events, send=self.commands.submit if self.commands else None)
        self.supervisor.on_decision = lambda decision: self.state.record_decision()
        self.recorder = (
            StatsRecorder(
                state_path(cfg, cfg.recording.dir, ""),
                max_file_bytes=cfg.recording.max_file_bytes,
                max_files=cfg.recording.max_files,
            )
            if cfg.recording.enabled
            else None
        )
        self.supervisor.recorder = self.recorder  # risk lines beside the statistics (docs/report.md)
        self.registry = make_registry(
            self.state, cfg, supervisor=self.supervisor, commands=self.commands, recorder=self.recorder
        )
        self.receiver = Receiver(self.state, cfg, on_message=self._on_message, owners=self.owners)
        self.registry.register(self.receiver)  # the statistics channel's handshake counters
        self.registry.register(self.owners)  # sentinel_agent_refused_total{reason}
        self.status = StatusBoard(
            self.state, self.supervisor, self.events, cfg, stats_endpoint=lambda: self.receiver.endpoint
        )
        self._http: HTTPService | None = None
        self._lock = threading.Lock()
        self._started = False
        self._listening = False
        self._stopped = False

    def _on_message(self, msg: StatsMessage, result: PushResult, received_at: float) -> None:
        if self.config.predict.ranks == "zero" and msg.rank != 0:
            return
        if self.recorder is not None:
            self.recorder.record(msg, received_at)
        self.supervisor.observe(msg, result.series)
        self.status.observe()

    @property
    def stats_endpoint(self) -> str:
        """The bound ZeroMQ endpoint, with the actual port."""
        if self.receiver.endpoint is None:
            raise RuntimeError("agent not started")
        return self.receiver.endpoint

    @property
    def commands_endpoint(self) -> str | None:
        """The bound command endpoint with the actual port; None when commands are disabled."""
        return None if self.commands is None else self.commands.endpoint

    @property
    def metrics_port(self) -> int:
        if self._http is None:
            raise RuntimeError("agent not started")
        return self._http.port

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
        """True while the receiver, command server and HTTP server threads run."""
        return bool(
            self._started
            and not self._stopped
            and self.receiver.alive
            and (self.commands is None or self.commands.alive)
            and self._http is not None
            and self._http.alive
        )

    def start(self) -> Agent:
        """Open the event log and every listener, and start serving; raises AgentStartError."""
        with self._lock:
            if self._started:
                return self
            if self._stopped:
                raise RuntimeError("a stopped agent cannot be restarted; create a new one")
            self._started = True
        try:
            self._secure()
            try:
                self.receiver.bind()
            except (zmq.ZMQError, OSError, ValueError) as exc:
                endpoint = self.config.stats_endpoint
                raise AgentStartError(f"cannot bind stats endpoint {endpoint}: {exc}") from exc
            if self.commands is not None:
                try:
                    self.commands.bind()
                except (zmq.ZMQError, OSError, ValueError) as exc:
                    endpoint = self.config.commands.endpoint
                    raise AgentStartError(f"cannot bind command endpoint {endpoint}: {exc}") from exc
            m = self.config.metrics
            try:
                app = make_app(self.registry, self.status.status, render_page)
                self._http = HTTPService(
                    m.host, m.port, app, certfile=m.certfile, keyfile=m.keyfile, client_cafile=m.client_cafile
                ).start()
            except (OSError, ValueError) as exc:
                raise AgentStartError(f"cannot serve metrics on {m.host}:{m.port}: {exc}") from exc
            self._advertise()
            self._open_state()  # after the listeners: a busy port fails before the event log is touched
            self.receiver.start()
            if self.commands is not None:
                self.commands.start()
        except BaseException:
            self.stop()
            raise
        self._listening = True
        logger.info(
            "sentinel agent listening: stats=%s commands=%s metrics=%s status page=%s events=%s",
            self.stats_endpoint,
            self.commands_endpoint or "disabled",
            self.metrics_url,
            self.metrics_url.removesuffix("metrics"),
            self.events.path,
        )
        return self

    def _secure(self) -> None:
        """CURVE for every channel without explicit keys, with the agent's own keys (agent/autokeys.py);
        with ``security.insecure`` those channels stay plain, said at every start."""
        cfg = self.config
        auto = [name for name, curve, on in self._channels() if on and curve.secret_file is None]
        if not auto:
            return
        if cfg.security.insecure:
            logger.warning(
                "security.insecure is true: the %s channel(s) are NOT authenticated. Any process that can reach "
                "them can feed false statistics, take a run's commands and write false acks into %s "
                "(docs/security.md); drop security.insecure to have CURVE",
                " and ".join(auto),
                self.events.path,
            )
            return
        keys_dir = cfg.security.keys_dir or str(Path(cfg.state_dir) / "keys")
        try:
            self.keys = keys = ensure_keys(keys_dir)
        except OSError as exc:
            raise AgentStartError(f"cannot use the CURVE keys in {keys_dir}: {exc}") from exc
        own = CurveConfig(secret_file=str(keys.server_secret_file), authorized_dir=str(keys.authorized_dir))
        if "statistics" in auto:
            self.receiver.curve = own
        if "command" in auto and self.commands is not None:
            self.commands.curve = own

    def _channels(self) -> list[tuple[str, object, bool]]:
        cfg = self.config
        return [("statistics", cfg.stats_curve, True), ("command", cfg.commands.curve, self.commands is not None)]

    def _advertise(self) -> None:
        """Discovery files for the channels served with the agent's own keys (a trainer of this user reads them)."""
        if self.keys is None:
            return
        if self.keys.created:
            logger.info("created the agent's CURVE keys in %s", self.keys.directory)
        served = [("statistics", self.receiver.endpoint, self.receiver.curve)]
        if self.commands is not None:
            served.append(("commands", self.commands.endpoint, self.commands.curve))
        for channel, endpoint, curve in served:
            if endpoint and curve.secret_file == str(self.keys.server_secret_file):
                try:
                    paths = self.discovery.write(endpoint, channel, self.keys)
                except OSError as exc:
                    logger.warning(
                        "cannot write the discovery file for %s in %s (%s): trainers must be given "
                        "%s/client.key_secret and server.key (publish.curve, control.curve)",
                        endpoint, self.discovery.directory, exc, self.keys.directory,
                    )  # fmt: skip
                    continue
                logger.info("%s channel: CURVE keys for trainers in %s", channel, paths[0])

    def _open_state(self) -> None:
        try:
            records = self.events.open()
            self.status.seed_events(records)
            self.events.append({"type": "agent_start", "pid": os.getpid(), "version": __version__})
        except OSError as exc:
            raise AgentStartError(f"cannot open the event log {self.events.path}: {exc.strerror or exc}") from exc
        self.supervisor.restore(records)
        rec = self.config.recording
        if self.recorder is not None and rec.warm_start_max_age_seconds > 0:
            warm_start(
                self.state,
                self.supervisor,
                self.recorder.directory,
                steps=self.config.history.steps,
                max_age_seconds=rec.warm_start_max_age_seconds,
            )
        if self.commands is not None:
            self.commands.restore(records)

    def stop(self) -> None:
        """Stop the threads, close the sockets and files, shut the HTTP server down; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.discovery.remove()
        self.receiver.stop()
        if self.commands is not None:
            self.commands.stop()
        if self.recorder is not None:
            self.recorder.close()
        self.events.close()
        if self._http is not None:
            self._http.stop()
        if self._listening:
            logger.info("sentinel agent stopped")

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
