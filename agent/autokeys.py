"""CURVE without a set-up step: the agent's own key pair and the discovery files trainers read.

Why CURVE by default rather than ``ipc://`` sockets in a private directory: a loopback TCP port
is open to every process in the node's network namespace (other users, other jobs, other
containers of a pod), and whoever binds it first plays the agent.  CURVE authenticates both
ends on any transport, so the default ports, the Prometheus scrape set-ups and the remote
configurations keep working unchanged, and each connection carries its client's public key,
which is what lets a run belong to the key that opened it (agent/owners.py).  ``ipc://`` would
protect the local case through file permissions only, and give no key to bind a run to.

On its first start the agent creates, in ``security.keys_dir`` (default ``<state_dir>/keys``,
mode 0700, secret files 0600), the layout of ``sentinel-agent keys DIR``: its own pair
(``server.key``, ``server.key_secret``), one trainer pair (``client.key``, ``client.key_secret``)
and ``authorized/`` holding the trainer keys it admits.  Later starts reuse them, so trainers and
their runs survive agent restarts.  For each channel served with these keys it then writes a
discovery file, ``<discovery dir>/<endpoint>.json`` (mode 0600, directory 0700; the format is in
docs/security.md), holding the agent's public key and the trainer pair.  A trainer of the same
user finds the file from its own endpoint alone (sentinel/discovery.py).  The discovery
directory is ``security.discovery_dir``, else ``$SENTINEL_DISCOVERY_DIR``, else
``$XDG_STATE_HOME/sentinel/agents`` (``~/.local/state/sentinel/agents``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from agent.keys import create_keys, load_secret
from sentinel_contract.channels import DISCOVERY_ENV, discovery_dir, discovery_name

logger = logging.getLogger("sentinel.agent")

DISCOVERY_VERSION = 1
ENV = DISCOVERY_ENV


class KeysError(OSError):
    """The key directory cannot be used (unsafe permissions, unreadable, incomplete)."""


#: where the discovery files go, and each one's name: the rule both sides read (sentinel_contract.channels)
default_discovery_dir = discovery_dir


def aliases(endpoint: str) -> list[str]:
    """The endpoints a trainer may use for a bound one: a wildcard bind is also reached on loopback."""
    out = [endpoint]
    for wildcard, loop in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"), ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(wildcard):
            out.append(loop + endpoint[len(wildcard) :])
    return out


@dataclass(frozen=True)
class AutoKeys:
    directory: Path
    server_secret_file: Path
    authorized_dir: Path
    server_public: bytes  # z85, as zmq.auth.load_certificate returns them
    client_public: bytes
    client_secret: bytes
    created: bool


def _private(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeysError(
            f"{what} {path} has mode {mode:04o}: others could read or replace the agent's keys. "
            f"chmod {'700' if path.is_dir() else '600'} it, or delete the directory to have new keys made"
        )


def ensure_keys(directory: str | Path) -> AutoKeys:
    """The key pairs in ``directory``, created on first use; raises KeysError (or OSError)."""
    d = Path(directory)
    created = False
    if not (d / "server.key_secret").exists():
        if (d / "client.key_secret").exists():
            raise KeysError(f"{d} holds client.key_secret but no server.key_secret; delete {d} to have new keys made")
        d.parent.mkdir(parents=True, exist_ok=True)
        create_keys(d)
        created = True
    _private(d, "key directory")
    for name in ("server.key_secret", "client.key_secret"):
        _private(d / name, "secret key file")
    try:
        server_public, _ = load_secret(d / "server.key_secret")
        client_public, client_secret = load_secret(d / "client.key_secret")
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot load the agent's keys from {d}: {exc}") from None
    if not (d / "authorized").is_dir():
        raise KeysError(f"{d / 'authorized'} is missing; delete {d} to have new keys made")
    return AutoKeys(d, d / "server.key_secret", d / "authorized", server_public, client_public, client_secret, created)


class Discovery:
    """The discovery files this agent wrote; ``remove`` deletes those still holding its key."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory else default_discovery_dir()
        self.paths: list[Path] = []
        self._mark = b""

    def write(self, endpoint: str, channel: str, keys: AutoKeys) -> list[Path]:
        """Write the file(s) for one bound endpoint (atomically, 0600 in a 0700 directory); raises OSError."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.directory.stat()
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise KeysError(
                f"discovery directory {self.directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "chmod 700 it"
            )
        self._mark = keys.server_public
        written = []
        for ep in aliases(endpoint):
            record = {
                "v": DISCOVERY_VERSION,
                "endpoint": ep,
                "channel": channel,
                "server_public": keys.server_public.decode(),
                "client_public": keys.client_public.decode(),
                "client_secret": keys.client_secret.decode(),
                "keys_dir": str(keys.directory.resolve()),
                "pid": os.getpid(),
                "written_at": time.time(),
            }
            path = self.directory / discovery_name(ep)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, json.dumps(record).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            written.append(path)
        self.paths += written
        return written

    def remove(self) -> None:
        """Delete the files still naming this agent's key and pid (another agent may have taken the port since)."""
        for path in self.paths:
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(path.read_bytes())
                if rec.get("pid") == os.getpid() and rec.get("server_public", "").encode() == self._mark:
                    path.unlink()
        self.paths = []
