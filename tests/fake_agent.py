"""Sockets that play the agent in tests, secured the way the agent secures its own by default.

``secure(sock, keys_dir)`` makes a socket a CURVE server with keys made as the agent makes them
(agent/autokeys.py); after it is bound, ``advertise(sock, keys)`` writes the discovery file a
trainer reads (sentinel/discovery.py), so the trainer under test runs on its default settings.
Without a ZAP handler in the socket's context, libzmq admits any client key.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from agent.autokeys import AutoKeys, Discovery, ensure_keys


def secure(sock: zmq.Socket, keys_dir: str | Path) -> AutoKeys:
    """Make ``sock`` (not yet bound) a CURVE server with the keys in ``keys_dir`` (created if missing)."""
    keys = ensure_keys(keys_dir)
    public, secret = zmq.auth.load_certificate(keys.server_secret_file)
    sock.curve_server = True
    sock.curve_secretkey, sock.curve_publickey = secret, public
    return keys


def advertise(sock: zmq.Socket, keys: AutoKeys) -> str:
    """Write the discovery file for the endpoint ``sock`` is bound to; returns that endpoint."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    Discovery(None).write(endpoint, "test", keys)
    return endpoint


def bind_secured(sock: zmq.Socket, keys_dir: str | Path, address: str = "tcp://127.0.0.1:*") -> str:
    """``secure``, bind to ``address`` and ``advertise``; returns the bound endpoint."""
    keys = secure(sock, keys_dir)
    sock.bind(address)
    return advertise(sock, keys)
