"""CURVE key pairs for the command channel (``sentinel-agent keys DIR``).

ZeroMQ's CURVE encrypts the channel and, with a ZAP authenticator, lets only clients whose
public key the agent holds connect.  ``create_keys`` writes, with ``zmq.auth.create_certificates``:

* ``server.key`` / ``server.key_secret``: the agent's pair (``commands.curve.secret_file``);
  the trainer needs ``server.key`` to know it talks to the right agent;
* ``client.key`` / ``client.key_secret``: one trainer's pair (its control client's secret file);
* ``authorized/client.key``: the public keys the agent admits (``commands.curve.authorized_dir``);
  add a trainer by copying its ``.key`` file there (read at agent start).

Secret files are made readable by their owner only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq.auth

FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key")


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
