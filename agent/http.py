"""The agent's HTTP server: ``/metrics`` for Prometheus, ``/`` and ``/api/status`` for people.

``/metrics`` is agent/exposition.py's WSGI application on the agent's registry: the
library's exposition byte for byte (text or OpenMetrics by ``Accept``, gzip, ``name[]`` filters
through prometheus_client's own application), written faster.  The status page and its JSON come from ``agent.status_page``.

Every connection gets its own thread, and the TLS handshake happens in that thread, not in
the accepting loop: a client that opens a TCP connection and then says nothing (or stalls
half-way through a request, or trickles it a byte at a time) holds only its own thread, and
for at most ``timeout`` seconds from the moment it was accepted: each connection has an overall
deadline, after which its socket is shut down whatever it is doing (handshake, reading the
request, or writing the answer to a slow reader), so a per-read timeout cannot be dodged by
sending a byte now and then.  The number of such threads is bounded (``max_connections``);
beyond it new connections are closed at once rather than queued.
Nothing here takes a lock of the agent except through the status and metrics callbacks,
which copy what they need and release it.

TLS: ``metrics.certfile``/``metrics.keyfile`` serve HTTPS (TLS 1.2 or newer); with
``metrics.client_cafile`` every client must also present a certificate signed by one of those
CAs (mutual TLS), checked in the handshake, before any HTTP is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.registry import Collector

from agent.exposition import make_metrics_app

logger = logging.getLogger("sentinel.agent")

WSGIApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

PATHS = ("/", "/api/status", "/metrics")


def make_ssl_context(certfile: str, keyfile: str, client_cafile: str | None = None) -> ssl.SSLContext:
    """Server context for HTTPS; with ``client_cafile``, clients must present a certificate it signed.

    Raises OSError or ssl.SSLError with the file named when a certificate or key cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=certfile, keyfile=keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise type(exc)(f"cannot load certificate {certfile!r} with key {keyfile!r}: {exc}") from exc
    if client_cafile is not None:
        try:
            ctx.load_verify_locations(cafile=client_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise type(exc)(f"cannot load client CA certificates from {client_cafile!r}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_app(
    registry: Collector,
    status: Callable[[], dict],
    render: Callable[[dict, str], str],
) -> WSGIApp:
    """WSGI application routing ``/metrics``, ``/`` (``render(status(), nonce)``) and ``/api/status``.

    An exception while building the page or the JSON is logged and answered with a 500; it
    never reaches the server loop.
    """
    metrics = make_metrics_app(registry)
    last_error_log = [-math.inf]

    def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _plain(start_response, "405 Method Not Allowed", "use GET\n", [("Allow", "GET")])
        try:
            if path == "/":
                nonce = secrets.token_urlsafe(16)
                body = render(status(), nonce).encode()
                headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", _csp(nonce))]
            elif path == "/api/status":
                body = json.dumps(status(), allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()
                headers = [("Content-Type", "application/json; charset=utf-8")]
            elif path == "/favicon.ico":
                start_response("204 No Content", [("Cache-Control", "max-age=86400")])
                return [b""]
            else:
                return _plain(start_response, "404 Not Found", f"not found; try {', '.join(PATHS)}\n")
        except Exception:
            if time.monotonic() - last_error_log[0] > 60.0:  # a page polled every 2 s must not flood the log
                last_error_log[0] = time.monotonic()
                logger.exception("cannot build %s (logged at most once a minute)", path)
            return _plain(start_response, "500 Internal Server Error", "internal error; see the agent's log\n")
        start_response("200 OK", [*headers, *_COMMON_HEADERS, ("Content-Length", str(len(body)))])
        return [body]

    return app


_COMMON_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


def _csp(nonce: str) -> str:
    """Only the page's own inline script and style run; it may fetch from its own origin only."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _plain(start_response: Callable[..., Any], status: str, text: str, extra: list | None = None) -> list[bytes]:
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, [*headers, *_COMMON_HEADERS, *(extra or [])])
    return [body]


class _Handler(WSGIRequestHandler):
    """wsgiref's handler with the server's timeout on the socket and its log sent to ours."""

    server: AgentHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_seconds
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s: %s", self.client_address[0], format % args)


class AgentHTTPServer(ThreadingMixIn, WSGIServer):
    """Thread per connection, at most ``max_connections`` at once; TLS handshake in that thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        max_connections: int = 32,
    ):
        family, sockaddr = _family(host, port)
        self.address_family = family
        self.ssl_context = ssl_context
        self.timeout_seconds = timeout
        self.max_connections = max_connections
        self.refused_connections = 0
        self.failed_handshakes = 0
        self.expired_connections = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        self._last_refusal_log = 0.0
        super().__init__(sockaddr, _Handler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the host's FQDN: a slow DNS would delay the start.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            now = time.monotonic()
            if now - self._last_refusal_log > 60.0:
                self._last_refusal_log = now
                logger.warning("HTTP server busy (%d connections open); closing new ones", self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        with _Deadline(request, self.timeout_seconds) as deadline:
            self._serve(request, client_address)
        if deadline.expired:
            self.expired_connections += 1
            logger.debug("HTTP connection from %s cut after %.1f s", client_address[0], self.timeout_seconds)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(self.timeout_seconds)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.failed_handshakes += 1
            logger.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_WR)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("HTTP connection from %s ended with an error", client_address[0], exc_info=True)


class _Deadline:
    """Shuts a connection down ``seconds`` after it was entered unless it has been left by then.

    The shutdown goes through a duplicate of the socket's descriptor: ``shutdown(2)`` acts on the
    connection, not on the descriptor, so it also ends a TLS socket that has taken over the
    original one, and the duplicate stays open (it cannot be reused by another connection) until
    the timer can no longer fire.
    """

    def __init__(self, sock: socket.socket, seconds: float):
        self._guard = sock.dup()
        self._lock = threading.Lock()
        self._done = False
        self.expired = False
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def _cut(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            with contextlib.suppress(OSError):
                self._guard.shutdown(socket.SHUT_RDWR)

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            self._guard.close()


def _family(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class HTTPService:
    """An AgentHTTPServer with its accepting thread: ``start()``, ``stop()``, ``alive``, ``port``."""

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
        timeout: float = 10.0,
        max_connections: int = 32,
    ):
        ctx = make_ssl_context(certfile, keyfile, client_cafile) if certfile and keyfile else None
        self.server = AgentHTTPServer(
            host, port, app, ssl_context=ctx, timeout=timeout, max_connections=max_connections
        )
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.1,), name="sentinel-http", daemon=True
        )  # polls for shutdown every 0.1 s: stop() returns quickly

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> HTTPService:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting and close the listening socket; connections in progress end on their own."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout)
        self.server.server_close()
