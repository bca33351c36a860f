"""Configuration of the sidecar agent (docs/configuration.md carries its generated table).

The dataclasses declare every key with its default, allowed range and documentation;
`load_config` adds the checks that span keys (endpoint syntax, TLS pairs, the refusal to
listen on a non-loopback address), so a bad setting fails at start with the key named.

Run `python -m agent.config` to print the reference table for the docs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.policy import PolicyConfig, parse_rules
from agent.predict import PredictConfig
from sentinel_contract.channels import (  # noqa: F401 (bind_endpoint, is_loopback, parse_tcp_endpoint: old homes)
    ServerCurve,
    bind_endpoint,
    check_endpoint,
    check_pair,
    is_loopback,
    parse_tcp_endpoint,
)
from sentinel_contract.typedconfig import ConfigError, load, option, reference_markdown

MiB = 1 << 20
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class MetricsConfig:
    host: str = option("127.0.0.1", doc="Address the HTTP server (/metrics, status page) listens on.")
    port: int = option(9477, range=(0, 65535), doc="TCP port of the HTTP server; 0 picks any free port.")
    certfile: str | None = option(None, doc="PEM certificate: serve HTTPS (needs `metrics.keyfile` too).")
    keyfile: str | None = option(None, doc="PEM private key for `metrics.certfile`.")
    client_cafile: str | None = option(
        None,
        doc="PEM CA certificate(s): require every HTTP client to present a certificate signed by one of them "
        "(mutual TLS; needs `metrics.certfile`).",
    )


@dataclass
class HistoryConfig:
    steps: int = option(1024, range=(16, 1_000_000), doc="Length of the per run/rank ring buffer, in messages (steps).")
    max_matrix_bytes: int = option(
        16 * MiB,
        range=(1024, 1 << 34),
        doc="Memory budget of the per-tensor statistics rings of one run/rank, in bytes, shared evenly "
        "by its layouts: each keeps min(history.steps, share / bytes per message) messages, and at "
        "least the latest one.",
    )
    max_layouts: int = option(
        8,
        range=(1, 1024),
        doc="Matrix layouts (tensor names x statistic names) kept per run/rank, e.g. parameter "
        "statistics and probe statistics; beyond this the least recently updated is dropped.",
    )


@dataclass
class LimitsConfig:
    max_message_bytes: int = option(
        16 * MiB,
        range=(1024, 1 << 30),
        doc="Largest accepted message (all frames), in bytes; larger ones are rejected as "
        "`oversized`. A frame over twice this size makes ZeroMQ drop the sending peer.",
    )
    max_series: int = option(
        4096,
        range=(1, 100_000),
        doc="Run/rank pairs tracked at once; a new pair beyond this evicts the least recently "
        "updated one (logged). Also bounds the cache of decoded layouts. Every rank of a job with "
        "`publish.ranks: all` is one pair: keep it above the job's ranks.",
    )
    max_scalar_names: int = option(
        64,
        range=(0, 10_000),
        doc="Scalar names per run/rank kept and exported as `sentinel_observed_value`, besides "
        "loss, grad_norm, step_duration_seconds and lr; further names are ignored (logged once).",
    )


@dataclass
class ExportConfig:
    max_tensors_per_stat: int = option(
        256,
        range=(1, 1_000_000),
        doc="Tensors exported per statistic and run/rank: if a run has more, only the ones with "
        "the largest values (NaN counts as largest) are exported.",
    )
    max_stats: int = option(
        32,
        range=(1, 1024),
        doc="Per-tensor statistics exported per run/rank, in layout order; further ones are kept "
        "in history but not exported.",
    )
    tensor_ranks: str = option(
        "lowest",
        choices=("lowest", "all"),
        doc="Ranks whose per-tensor and per-module statistics are exported: 'lowest', the lowest rank of each "
        "run that sends them (the ranks of a data-parallel job hold the same statistics, so /metrics grows "
        "with the ranks only by their scalars), or 'all' (tensors x ranks series).",
    )


@dataclass
class SecurityConfig:
    insecure: bool = option(
        False,
        doc="Serve the statistics and command channels without CURVE (those without `stats_curve` / "
        "`commands.curve`). Any process that can reach them can then feed false statistics, take a run's "
        "commands and write false acks into the event log (docs/security.md); logged as a WARNING at every start.",
    )
    keys_dir: str | None = option(
        None,
        doc="Where the agent keeps the CURVE keys it makes itself (created mode 0700 at first start); "
        "default: `<state_dir>/keys`.",
    )
    discovery_dir: str | None = option(
        None,
        doc="Where the agent writes one discovery file per channel for trainers of the same user; default: "
        "`$SENTINEL_DISCOVERY_DIR`, else `$XDG_STATE_HOME/sentinel/agents` (`~/.local/state/sentinel/agents`).",
    )
    allow_insecure_remote: bool = option(
        False,
        doc="Allow `metrics.host` on a non-loopback address without mutual TLS (`metrics.client_cafile`), and "
        "with `security.insecure`, the ZeroMQ channels on a non-loopback address. None of these is then "
        "authenticated, so keep this false unless the network is trusted.",
    )


@dataclass
class EventsConfig:
    path: str | None = option(
        None, doc="Append-only decision log (JSON lines, fsynced); default: `<state_dir>/events.jsonl`."
    )


@dataclass
class RecordingConfig:
    enabled: bool = option(
        True, doc="Record accepted statistics of the `predict.ranks` ranks for `sentinel-agent replay`."
    )
    dir: str | None = option(None, doc="Directory of the `stats-<run>.jsonl` files; default: `<state_dir>`.")
    max_file_bytes: int = option(
        64 * MiB, range=(4096, 1 << 40), doc="Size at which a run's recording file is rotated, in bytes."
    )
    max_files: int = option(4, range=(1, 1000), doc="Files kept per run (current + rotated); older ones are deleted.")
    warm_start_max_age_seconds: float = option(
        3600.0,
        range=(0.0, 1e9),
        doc="At start, runs whose recording changed within this many seconds get their history and detector "
        "state back from the recording's last `history.steps` messages (agent/warm.py); 0 turns this off.",
    )


#: the agent's CURVE sections (``commands.curve``, ``stats_curve``): one type, sentinel_contract.channels
CurveConfig = StatsCurveConfig = ServerCurve


@dataclass
class CommandsConfig:
    enabled: bool = option(True, doc="Serve the command channel; false: decisions are logged but no command is sent.")
    endpoint: str = option(
        "tcp://127.0.0.1:5558",
        doc="ZeroMQ endpoint of the agent's ROUTER socket for commands (`tcp://HOST:PORT` or `ipc://PATH`).",
    )
    resend_seconds: float = option(
        5.0, range=(0.01, 3600.0), doc="A command not acknowledged within this time is sent again (same id)."
    )
    expire_seconds: float = option(
        600.0, range=(1.0, 604800.0), doc="A command still unacknowledged after this long is given up (logged)."
    )
    curve: ServerCurve = field(default_factory=ServerCurve)


@dataclass
class AgentConfig:
    stats_endpoint: str = option(
        "tcp://127.0.0.1:5557",
        doc="ZeroMQ endpoint the agent binds its PULL socket to (`tcp://HOST:PORT` or "
        "`ipc://PATH`); PORT may be `*` or 0 for any free port.",
    )
    stats_curve: ServerCurve = field(default_factory=ServerCurve)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log_level: str = option("info", choices=LOG_LEVELS, doc="Verbosity of the agent's log on stderr.")
    state_dir: str = option(
        "./sentinel-agent-state",
        doc="Directory for the event log and the recordings (created at start; relative to the working directory).",
    )
    events: EventsConfig = field(default_factory=EventsConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def validate(cfg: AgentConfig) -> AgentConfig:
    """Checks that involve more than one value or parse a string; raises ConfigError."""
    _validate_curve(cfg.stats_curve, "stats_curve")
    check_endpoint(
        "stats_endpoint",
        cfg.stats_endpoint,
        plain=cfg.stats_curve.secret_file is None and cfg.security.insecure,
        allow_remote=cfg.security.allow_insecure_remote,
        insecure_key="security.insecure",
        allow_key="security.allow_insecure_remote",
        risk="anyone who can reach it could feed the agent false statistics, and so trigger rollbacks",
    )
    m = cfg.metrics
    mutual_tls = bool(m.certfile and m.keyfile and m.client_cafile)  # clients authenticated in the handshake
    if not cfg.security.allow_insecure_remote and not mutual_tls and not is_loopback(m.host):
        raise ConfigError(
            f"metrics.host: {m.host!r} is not a loopback address; /metrics is not "
            "authenticated. Set metrics.certfile, metrics.keyfile and metrics.client_cafile (mutual TLS), "
            "or security.allow_insecure_remote: true on a trusted network"
        )
    _validate_commands(cfg)
    parse_rules(cfg.policy.rules)
    if (cfg.metrics.certfile is None) != (cfg.metrics.keyfile is None):
        missing = "metrics.keyfile" if cfg.metrics.keyfile is None else "metrics.certfile"
        raise ConfigError(f"{missing}: required when the other of metrics.certfile/metrics.keyfile is set")
    cafile = cfg.metrics.client_cafile
    if cafile is not None:
        if cfg.metrics.certfile is None:
            raise ConfigError("metrics.client_cafile: needs metrics.certfile and metrics.keyfile (mutual TLS is TLS)")
        if not Path(cafile).is_file():
            raise ConfigError(f"metrics.client_cafile: {cafile!r} is not a file")
    return cfg


def _validate_curve(curve: ServerCurve, key: str) -> None:
    check_pair(key, curve)
    if curve.secret_file is not None and not Path(curve.secret_file).is_file():
        raise ConfigError(f"{key}.secret_file: {curve.secret_file!r} is not a file")
    if curve.authorized_dir is not None and not Path(curve.authorized_dir).is_dir():
        raise ConfigError(f"{key}.authorized_dir: {curve.authorized_dir!r} is not a directory")


def _validate_commands(cfg: AgentConfig) -> None:
    c = cfg.commands
    curve = c.curve
    _validate_curve(curve, "commands.curve")
    if not c.enabled:
        return
    check_endpoint(
        "commands.endpoint",
        c.endpoint,
        plain=curve.secret_file is None and cfg.security.insecure,
        allow_remote=cfg.security.allow_insecure_remote,
        insecure_key="security.insecure",
        allow_key="security.allow_insecure_remote",
        risk="anyone who can reach it could roll the run back",
    )


def state_path(cfg: AgentConfig, value: str | None, default_name: str) -> Path:
    """``value`` if set, else ``<state_dir>/<default_name>``."""
    return Path(value) if value else Path(cfg.state_dir) / default_name


def load_config(source: str | Path | dict | AgentConfig | None = None, **overrides: Any) -> AgentConfig:
    """AgentConfig from a YAML path, dict, instance or None, with dotted-key overrides, validated."""
    return validate(load(AgentConfig, source, **overrides))


def as_dict(cfg: AgentConfig) -> dict:
    return dataclasses.asdict(cfg)


if __name__ == "__main__":
    print(reference_markdown(AgentConfig), end="")
