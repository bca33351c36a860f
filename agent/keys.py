"""CURVE key pairs and the authenticator that admits them, for both ZeroMQ channels.

ZeroMQ's CURVE encrypts a channel and, with a ZAP authenticator, lets only clients whose
public key the agent holds connect.  ``sentinel-agent keys DIR`` (``create_keys``) writes, with
``zmq.auth.create_certificates``:

* ``server.key`` / ``server.key_secret``: the agent's pair (``stats_curve.secret_file`` and
  ``commands.curve.secret_file``); the trainer needs ``server.key`` to know it talks to the
  right agent;
* ``client.key`` / ``client.key_secret``: one trainer's pair (``publish.curve.secret_file`` and
  ``control.curve.secret_file`` of the trainer);
* ``authorized/client.key``: the public keys the agent admits (``stats_curve.authorized_dir``,
  ``commands.curve.authorized_dir``); add a trainer by copying its ``.key`` file there (read
  at agent start).

Secret files are made readable by their owner only.  docs/security.md has the whole model.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger("sentinel.agent")

FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key")

# Security-handshake failures a socket monitor reports, with the log text for each.
HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed: protocol error (a client without the right security mechanism?)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake failed: authentication refused",
}


class KeysExistError(FileExistsError):
    """DIR already holds key files; pass force=True to replace them."""


def create_keys(directory: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Create the agent's and one client's key pair in ``directory``; returns the paths by role."""
    d = Path(directory)
    existing = [name for name in FILES if (d / name).exists()]
    if existing and not force:
        raise KeysExistError(f"{d} already holds {', '.join(existing)}; use --force to replace them")
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    server_public, server_secret = zmq.auth.create_certificates(d, "server")
    client_public, client_secret = zmq.auth.create_certificates(d, "client")
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    authorized = d / "authorized" / "client.key"
    shutil.copyfile(client_public, authorized)
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_public": Path(client_public),
        "client_secret": Path(client_secret),
        "authorized_dir": d / "authorized",
    }


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate; raises OSError or ValueError if it holds no secret key."""
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


class CurveAuthenticator(ThreadAuthenticator):
    """ZAP handler admitting the client keys of one directory; counts and logs every refusal.

    ZAP is per ZeroMQ context (``inproc://zeromq.zap.01``), so each channel's socket needs a
    context of its own.  ``channel`` and ``setting`` only word the log line; ``allow_log`` (e.g. a
    rate limiter's ``allow``) may hold back lines, since a refused client retries every 100 ms.
    """

    def __init__(
        self, context: zmq.Context, *, channel: str, setting: str, allow_log: Callable[[str], bool] | None = None
    ):
        super().__init__(context, log=logging.getLogger("sentinel.agent.zap"))
        self.channel, self.setting = channel, setting
        self.allow_log = allow_log or (lambda key: True)
        self.refused = 0
        self._request: tuple[str, str] = ("?", "?")

    def start_for(self, authorized_dir: str | Path) -> CurveAuthenticator:
        """Start the thread and admit the keys in ``authorized_dir``; returns self."""
        self.start()
        self.configure_curve(domain="*", location=str(authorized_dir))
        return self

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        key = z85.encode(msg[6]).decode() if len(msg) > 6 and len(msg[6]) == 32 else "?"
        self._request = (address, key)
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous") -> None:
        if status_code != b"200":
            self.refused += 1
            address, key = self._request
            if self.allow_log("zap"):
                logger.warning(
                    "%s channel: refused client %s with CURVE key %s: %s (not in %s)",
                    self.channel,
                    address[:100],
                    key,
                    status_text.decode("utf-8", "replace"),
                    self.setting,
                )
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def failed_handshakes(monitor: zmq.Socket, limit: int = 100) -> Iterator[tuple[str, object]]:
    """(description, code) of each failed security handshake waiting on a socket monitor, at most ``limit``."""
    for _ in range(limit):
        try:
            event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        text = HANDSHAKE_EVENTS.get(event["event"])
        if text is not None:
            yield text, event.get("value")
