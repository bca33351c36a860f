"""The two ZeroMQ channels as both ends configure them: endpoint syntax, loopback, CURVE, discovery.

The agent binds the statistics and command endpoints and the trainer connects to them, so the two
must read an endpoint the same way and apply the same rule: a channel without CURVE stays on
loopback unless its configuration says the network is trusted (docs/security.md).  Before this
module the rule was written three times with two parsers.  Here is the one parser
(``parse_tcp_endpoint``), the one loopback test (``is_loopback``), the one endpoint check
(``check_endpoint``) and the CURVE sections: ``ClientCurve`` for the trainer's two sockets (its key
pair and the agent's public key) and ``ServerCurve`` for the agent's two (its key pair and the
directory of client keys it admits), each pair checked by ``check_pair``.  The discovery file, where
an agent that made its own keys advertises them to trainers of the same user, is named and placed
by ``discovery_path`` for both the agent that writes it and the trainer that reads it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sentinel_contract.typedconfig import ConfigError, option

_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/\[\]]+):(?P<port>\*|\d+)$")


def parse_tcp_endpoint(endpoint: str) -> tuple[str, int | None]:
    """(host, port) of ``tcp://HOST:PORT``; port None means any free port (``*`` or 0); raises ValueError."""
    m = _TCP.match(endpoint)
    if not m:
        raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT")
    port = m["port"]
    if port == "*" or int(port) == 0:
        return m["host"], None
    if int(port) > 65535:
        raise ValueError(f"port {port} is out of range")
    return m["host"], int(port)


def bind_endpoint(endpoint: str) -> str:
    """The endpoint as ZeroMQ should bind it: ``:0`` written as ``:*``."""
    if endpoint.startswith("tcp://"):
        host, port = parse_tcp_endpoint(endpoint)
        return f"tcp://{host}:{'*' if port is None else port}"
    return endpoint


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs; False for wildcards, other IPs and unresolved names."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_FORMS = {"tcp": "tcp://HOST:PORT", "ipc": "ipc://PATH", "inproc": "inproc://NAME"}


def check_endpoint(
    key: str,
    endpoint: str,
    *,
    plain: bool,
    allow_remote: bool,
    insecure_key: str,
    allow_key: str,
    risk: str,
    schemes: tuple[str, ...] = ("tcp", "ipc"),
) -> str | None:
    """Refuse a malformed ``endpoint`` (config key ``key``), and one off this host for a channel without
    CURVE (``plain``) unless ``allow_remote``; ``risk`` says what an attacker could then do.

    Returns the TCP host, or None for an ``ipc://``/``inproc://`` endpoint; raises ConfigError.
    """
    forms = [_FORMS[s] for s in schemes]
    allowed = " or ".join(forms) if len(forms) < 3 else ", ".join(forms[:-1]) + " or " + forms[-1]
    if not endpoint.startswith("tcp://"):
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in schemes or scheme == "tcp" or not rest:
            raise ConfigError(f"{key}: {endpoint!r} is not allowed; allowed: {allowed}")
        return None
    try:
        host, _ = parse_tcp_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}; allowed: {allowed}") from None
    if plain and not allow_remote and not is_loopback(host):
        raise ConfigError(
            f"{key}: {endpoint!r} is not a loopback address and {insecure_key} is true; {risk}. Drop "
            f"{insecure_key} (CURVE is the default), or set {allow_key}: true on a trusted network"
        )
    return host


@dataclass
class ClientCurve:
    """The CURVE keys of a connecting socket (the trainer's), when not discovered from the local agent."""

    PAIRED_WITH: ClassVar[str] = "server_public_file"

    secret_file: str | None = option(
        None,
        doc="The trainer's secret certificate (`client.key_secret` from `sentinel-agent keys DIR`); with "
        "`server_public_file` beside it, these keys instead of the local agent's discovery file (docs/security.md).",
    )
    server_public_file: str | None = option(
        None,
        doc="The agent's public certificate (`server.key` from `sentinel-agent keys DIR`); goes with `secret_file`.",
    )


@dataclass
class ServerCurve:
    """The CURVE keys of a binding socket (the agent's), when not the keys it makes itself."""

    PAIRED_WITH: ClassVar[str] = "authorized_dir"

    secret_file: str | None = option(
        None,
        doc="The agent's secret certificate (`server.key_secret` from `sentinel-agent keys DIR`), with "
        "`authorized_dir` beside it; unset: the agent's own keys in `security.keys_dir` (docs/security.md).",
    )
    authorized_dir: str | None = option(
        None,
        doc="Directory of the client (trainer) public certificates admitted (`DIR/authorized`); any other key "
        "is refused in the handshake, so nothing it sends arrives.",
    )


def check_pair(key: str, curve: ClientCurve | ServerCurve | Any) -> None:
    """A CURVE section names both of its files or neither; raises ConfigError naming ``key``."""
    other = curve.PAIRED_WITH
    if (curve.secret_file is None) != (getattr(curve, other) is None):
        missing, present = (other, "secret_file") if curve.secret_file is not None else ("secret_file", other)
        raise ConfigError(
            f"{key}.{missing}: required, since {key}.{present} is set ({key}: secret_file and {other} go together)"
        )


DISCOVERY_ENV = "SENTINEL_DISCOVERY_DIR"


def discovery_dir() -> Path:
    """``$SENTINEL_DISCOVERY_DIR``, else ``$XDG_STATE_HOME/sentinel/agents``, else ``~/.local/state/sentinel/agents``."""
    env = os.environ.get(DISCOVERY_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sentinel" / "agents"


def discovery_name(endpoint: str) -> str:
    """The discovery file name of an endpoint: ``tcp-127.0.0.1-5557.json``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", endpoint.replace("://", "-")).strip("-")[:200] + ".json"


def discovery_path(endpoint: str, directory: Path | None = None) -> Path:
    """The file an agent bound at ``endpoint`` writes, as a trainer looks it up (``localhost`` as 127.0.0.1)."""
    endpoint = endpoint.replace("tcp://localhost:", "tcp://127.0.0.1:")
    return (directory or discovery_dir()) / discovery_name(endpoint)
