"""The trainer's side of CURVE, shared by the statistics publisher and the command client.

Both channels connect to the agent; off this host they must be authenticated (docs/security.md),
so an endpoint that is not loopback needs ``<section>.curve`` unless ``<section>.allow_insecure_remote``.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.auth

from agent.typedconfig import ConfigError


def check_endpoint(section: str, config: Any, risk: str) -> None:
    """Refuse ``<section>.endpoint`` off this host without CURVE; ``risk`` says what an attacker could do."""
    from agent.config import is_loopback

    ep = config.endpoint
    if not ep.startswith("tcp://"):
        if not ep.startswith(("ipc://", "inproc://")) or ep.endswith("://"):
            raise ConfigError(f"{section}.endpoint: {ep!r} must be tcp://HOST:PORT, ipc://PATH or inproc://NAME")
        return
    host, _, port = ep[len("tcp://") :].rpartition(":")
    if not host.strip("[]") or not port:
        raise ConfigError(f"{section}.endpoint: {ep!r} must be tcp://HOST:PORT")
    if not is_loopback(host) and config.curve.secret_file is None and not config.allow_insecure_remote:
        raise ConfigError(
            f"{section}.endpoint: {ep!r} is not a loopback address and {section}.curve is not set; {risk}. "
            f"Set {section}.curve, or {section}.allow_insecure_remote: true"
        )


def _certificate(path: str | None, key: str) -> tuple[bytes, bytes | None]:
    if not path:
        raise ConfigError(f"{key}: required when the other CURVE file is set")
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a certificate from {path!r}: {exc}") from None


def client_keys(section: str, curve: Any) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) for a CURVE client socket; raises ConfigError naming the key."""
    public, secret = _certificate(curve.secret_file, f"{section}.curve.secret_file")
    if not secret:
        raise ConfigError(f"{section}.curve.secret_file: {curve.secret_file!r} holds no secret key")
    server, _ = _certificate(curve.server_public_file, f"{section}.curve.server_public_file")
    return public, secret, server


def set_client_keys(sock: zmq.Socket, section: str, curve: Any) -> None:
    public, secret, server = client_keys(section, curve)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server
