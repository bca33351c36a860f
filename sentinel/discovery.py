"""The trainer's half of CURVE without configuration: read the keys a local agent advertised.

An agent serving a channel with the keys it made itself writes ``<dir>/<endpoint>.json``
(agent/autokeys.py; format in docs/security.md): its public key and a trainer key pair it
admits.  The trainer looks the file up from its own endpoint, so nothing has to be configured
on the same host.  ``<dir>`` is ``$SENTINEL_DISCOVERY_DIR``, else ``$XDG_STATE_HOME/sentinel/agents``,
else ``~/.local/state/sentinel/agents``; the file's name and place come from
``sentinel_contract.channels``, which the agent that writes it uses too.

A file or directory that others could write is refused (whoever wrote it would choose the key
the trainer trusts), and so is a file others could read (its trainer key proves nothing).
``ChannelKeys.poll`` is what the publisher and the command client call from the training step:
a clock comparison, and at most once a second a ``stat`` (and, when the file changed, one small
read), so a trainer started before its agent, or an agent restarted with new keys, is picked
up without a restart and the step never waits.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

from sentinel_contract.channels import DISCOVERY_ENV, discovery_dir, discovery_path  # noqa: F401 (discovery_dir: API)

ENV = DISCOVERY_ENV
LOOK_SECONDS = 1.0


def read_keys(path: Path) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public), z85, from a discovery file; raises ValueError or OSError."""
    for p, what in ((path.parent, "directory"), (path, "file")):
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o022:
            raise ValueError(f"discovery {what} {p} is writable by others (mode {mode:04o}); not trusted")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"discovery file {path} is readable by others (mode {mode:04o}); its key proves nothing")
    rec = json.loads(path.read_bytes())
    if not isinstance(rec, dict) or rec.get("v") != 1:
        raise ValueError(f"{path} is not a version 1 discovery file")
    keys = tuple(rec.get(k) for k in ("client_public", "client_secret", "server_public"))
    if not all(isinstance(k, str) and len(k) == 40 for k in keys):
        raise ValueError(f"{path} does not hold three 40-character z85 keys")
    return tuple(k.encode() for k in keys)  # type: ignore[return-value]


class ChannelKeys:
    """The CURVE keys of one trainer socket, from its discovery file, kept up to date by ``poll``."""

    def __init__(self, endpoint: str, *, clock=time.monotonic):
        self.path = discovery_path(endpoint)
        self.clock = clock
        self.keys: tuple[bytes, bytes, bytes] | None = None
        self.problem = ""
        self._seen: tuple | None = None
        self._next = 0.0
        self.poll(force=True)

    def poll(self, force: bool = False) -> bool:
        """True when the keys changed since the last call (the socket must be rebuilt)."""
        now = self.clock()
        if not force and now < self._next:
            return False
        self._next = now + LOOK_SECONDS
        try:
            st = self.path.stat()
        except OSError:
            if self.keys is None:
                self.problem = f"{self.path} does not exist (no agent has advertised keys for this endpoint yet)"
            return False  # a stopped agent removes its file: keep the keys in use
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            keys = read_keys(self.path)
        except (OSError, ValueError) as exc:
            self.problem = str(exc)
            return False
        self.problem = ""
        if keys == self.keys:
            return False
        self.keys = keys
        return True
