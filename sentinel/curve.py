"""The trainer's side of CURVE, shared by the statistics publisher and the command client.

Both channels are CURVE clients by default (docs/security.md): with ``<section>.curve`` the
configured key files (a mounted Secret, a remote agent), otherwise the keys a local agent
advertised for the endpoint (sentinel/discovery.py).  Only ``<section>.insecure: true`` connects
without authentication, said in a WARNING at every start; off loopback it also needs
``<section>.allow_insecure_remote``.  ``Security`` is what a socket asks for its keys: it never
blocks, so the trainer's step does not wait on authentication (the handshake itself runs in
ZeroMQ's I/O thread).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
import zmq.auth

from sentinel.discovery import ChannelKeys
from sentinel_contract import channels
from sentinel_contract.typedconfig import ConfigError

log = logging.getLogger("sentinel")


def check_endpoint(section: str, config: Any, risk: str) -> None:
    """Refuse ``<section>.endpoint`` off this host without CURVE; ``risk`` says what an attacker could do."""
    channels.check_pair(f"{section}.curve", config.curve)
    if config.allow_insecure_remote and not config.insecure:
        raise ConfigError(
            f"{section}.allow_insecure_remote: needs {section}.insecure: true (the channel is authenticated "
            f"with CURVE by default; set {section}.curve for a remote agent)"
        )
    channels.check_endpoint(
        f"{section}.endpoint",
        config.endpoint,
        plain=config.curve.secret_file is None and config.insecure,
        allow_remote=config.allow_insecure_remote,
        insecure_key=f"{section}.insecure",
        allow_key=f"{section}.allow_insecure_remote",
        risk=risk,
        schemes=("tcp", "ipc", "inproc"),
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


class Security:
    """Where one trainer socket gets its CURVE keys: configured files, discovery, or none (insecure).

    ``keys`` is None while a discovering socket has found nothing yet; such a socket is not
    connected at all (its messages are dropped and counted, as with no agent).  ``poll()`` is
    cheap enough for every step and says when the keys changed.
    """

    def __init__(self, section: str, endpoint: str, curve: Any = None, insecure: bool = False, what: str = ""):
        self.section, self.endpoint, self.what = section, endpoint, what or section
        self.discovered: ChannelKeys | None = None
        self.keys: tuple[bytes, bytes, bytes] | None = None
        self.mode = "insecure" if insecure and not (curve is not None and curve.secret_file) else "curve"
        self._warned = False
        if curve is not None and curve.secret_file:
            self.keys = client_keys(section, curve)
        elif insecure:
            log.warning(
                "sentinel: %s.insecure is true: %s go to %s without authentication; any local process that "
                "binds it first receives them%s (docs/security.md)",
                section, self.what, endpoint,
                " and can command this run" if section == "control" else "",
            )  # fmt: skip
        else:
            self.mode = "discovered"
            self.discovered = ChannelKeys(endpoint)
            self.keys = self.discovered.keys
            if self.keys is None:
                self._say_missing()

    def poll(self) -> bool:
        """True when new keys were discovered (rebuild the socket with ``apply``)."""
        if self.discovered is None or not self.discovered.poll():
            if self.discovered is not None and self.keys is None and self.discovered.problem:
                self._say_missing()
            return False
        first = self.keys is None
        self.keys = self.discovered.keys
        log.info(
            "sentinel: %s: CURVE keys for %s %s from %s",
            self.section, self.endpoint, "found" if first else "changed, reconnecting", self.discovered.path,
        )  # fmt: skip
        return True

    def _say_missing(self) -> None:
        if self._warned:
            return
        self._warned = True
        assert self.discovered is not None
        log.warning(
            "sentinel: %s: no CURVE keys for the agent at %s yet: %s. %s are dropped (counted) until an agent "
            "there has started (it writes the file; $SENTINEL_DISCOVERY_DIR moves it), or set %s.curve "
            "(keys of `sentinel-agent keys DIR`, e.g. a mounted Secret)",
            self.section, self.endpoint, self.discovered.problem, self.what.capitalize(), self.section,
        )  # fmt: skip

    def apply(self, sock: zmq.Socket) -> None:
        if self.keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.keys

    @property
    def ready(self) -> bool:
        """False while a discovering socket has no keys: do not connect (nothing would be authenticated)."""
        return self.mode == "insecure" or self.keys is not None
