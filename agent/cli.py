"""Command line of the agent: ``sentinel-agent run | replay | keys | grafana | report`` (or ``python -m agent``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent import __version__, grafana_push
from agent.config import LOG_LEVELS, AgentConfig, load_config
from agent.daemon import Agent, AgentStartError
from agent.keys import KeysExistError, create_keys
from agent.recording import RecordingError
from agent.replay import format_decision, nothing_decided, replay
from agent.report import command as report_command
from sentinel_contract.typedconfig import ConfigError, write_commented

logger = logging.getLogger("sentinel.agent")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit codes:
  0  stopped cleanly (SIGTERM or SIGINT)
  1  runtime error, e.g. an address already in use
  2  usage or configuration error (the message names the key, the value and what is allowed)
"""

MAIN_EPILOG = """\
exit codes: (each command's --help lists its own)
  0  success (run: stopped cleanly by SIGTERM or SIGINT)
  1  runtime error, e.g. an address already in use, an unreadable recording, existing keys
  2  usage or configuration error (the message names the key, the value and what is allowed)
"""

DESCRIPTION = (
    "The llm-sentinel sidecar agent: receives per-step training statistics from the trainer "
    "over ZeroMQ, exports them as Prometheus metrics, predicts loss spikes and sends recovery "
    "commands (rollback, skip, LR scale, stop) under a policy, with an audit log."
)

REPLAY_DESCRIPTION = (
    "Run a statistics recording (stats-<run>.jsonl, written by `run` under its state directory) "
    "through the predictors and the policy offline, with no socket, and print the decisions one "
    "per line. Rotated files (stats-<run>.N.jsonl) can be given oldest first."
)

REPLAY_EPILOG = """exit codes:
  0  replayed (whether or not there were decisions)
  1  a file cannot be read or is not a sentinel recording
  2  usage or configuration error
"""

KEYS_DESCRIPTION = (
    "Create CURVE key pairs for the command and statistics channels in DIR: server.key/server.key_secret "
    "(the agent), client.key/client.key_secret (a trainer) and authorized/ holding the client's public "
    "key. `run` makes them by itself in <state_dir>/keys and advertises them to local trainers; use this "
    "for keys you distribute (a Kubernetes Secret, a remote agent), then set commands.curve and stats_curve: "
    "{secret_file: DIR/server.key_secret, authorized_dir: DIR/authorized}, or to rotate the agent's own "
    "keys (--force on <state_dir>/keys while it is stopped). docs/security.md."
)

KEYS_EPILOG = """exit codes:
  0  keys written
  1  DIR already holds keys (use --force), or cannot be written
  2  usage error
"""

RUN_DESCRIPTION = (
    "Run the agent in the foreground until SIGTERM or SIGINT. Options given here override "
    "the configuration file (docs/configuration.md lists every key)."
)


INIT_HEADER = """\
agent.yaml: the agent's configuration, written by `sentinel-agent init`.
Every key is here with its default (leaving a key out gives the same) and why it exists.
Use it: sentinel-agent run --config agent.yaml; reference: docs/configuration.md"""

INIT_EPILOG = """exit codes:
  0  written
  1  the file exists (use --force) or cannot be written
  2  usage error
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sentinel-agent", description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent", description=RUN_DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    run.add_argument("--config", type=Path, metavar="PATH", help="agent YAML configuration file")
    run.add_argument("--stats-endpoint", metavar="ENDPOINT", help="ZeroMQ endpoint to bind (tcp://127.0.0.1:*)")
    run.add_argument("--metrics-host", metavar="HOST", help="address of the HTTP server: /metrics, status page /")
    run.add_argument("--metrics-port", type=int, metavar="N", help="port of the HTTP server (0: any)")
    run.add_argument("--commands-endpoint", metavar="ENDPOINT", help="ZeroMQ endpoint of the command channel")
    run.add_argument("--state-dir", metavar="DIR", help="directory of the event log and recordings")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default: info)")
    run.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="once the listeners are up, write JSON {pid, stats_endpoint, commands_endpoint, metrics_url, "
        "events_path} here (atomically)",
    )
    rep = sub.add_parser(
        "replay",
        help="replay a statistics recording through the predictors and policy",
        description=REPLAY_DESCRIPTION,
        epilog=REPLAY_EPILOG,
        formatter_class=fmt,
    )
    rep.add_argument("files", nargs="+", type=Path, metavar="FILE", help="recording file(s), oldest first")
    rep.add_argument("--config", type=Path, metavar="PATH", help="agent YAML configuration (predict, policy)")
    rep.add_argument("--json", action="store_true", help="print each decision as its events.jsonl record")
    rep.add_argument("--all", action="store_true", help="also print decisions the policy's limits suppressed")
    rep.add_argument("--events", type=Path, metavar="PATH", help="also write the decisions to this events file")
    keys = sub.add_parser(
        "keys", help="create CURVE keys for the command and statistics channels", description=KEYS_DESCRIPTION,
        epilog=KEYS_EPILOG, formatter_class=fmt,
    )  # fmt: skip
    keys.add_argument("dir", type=Path, metavar="DIR", help="directory to write the keys to (created)")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    init = sub.add_parser(
        "init",
        help="write a commented agent.yaml with every key, its default and why",
        description="Write the agent's configuration file with every key at its default, each after a comment "
        "saying what it does and what is allowed (generated from agent.config, as docs/configuration.md is).",
        epilog=INIT_EPILOG,
        formatter_class=fmt,
    )
    init.add_argument("path", nargs="?", default="agent.yaml", help="file to write (default agent.yaml; - for stdout)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    grafana_push.add_parser(sub, fmt)
    report_command.add_parser(sub, fmt)
    return parser


def write_ready_file(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: readers see no file or the whole file, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "stats_endpoint": args.stats_endpoint,
        "metrics.host": args.metrics_host,
        "metrics.port": args.metrics_port,
        "commands.endpoint": args.commands_endpoint,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _error(message: str) -> None:
    print(f"sentinel-agent: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, **_overrides(args))
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        _error(f"configuration error: cannot read {args.config}: {exc.strerror or exc}")
        return EXIT_USAGE
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    agent = Agent(config)
    try:
        agent.start()
    except AgentStartError as exc:
        _error(f"error: {exc}")
        return EXIT_RUNTIME
    rc = EXIT_OK
    try:
        if args.ready_file is not None:
            info = {"pid": os.getpid(), "stats_endpoint": agent.stats_endpoint}
            info.update(commands_endpoint=agent.commands_endpoint, events_path=str(agent.events.path))
            write_ready_file(args.ready_file, {**info, "metrics_url": agent.metrics_url})
        while not stop.wait(0.5):
            if not agent.healthy:
                logger.error("a listener thread died; stopping")
                rc = EXIT_RUNTIME
                break
    except OSError as exc:
        _error(f"error: cannot write ready file {args.ready_file}: {exc.strerror or exc}")
        rc = EXIT_RUNTIME
    finally:
        agent.stop()
        if args.ready_file is not None:
            args.ready_file.unlink(missing_ok=True)
    return rc


def run_replay(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    try:
        result = replay(args.files, config, events_path=args.events)
    except (OSError, RecordingError) as exc:
        _error(f"error: {exc}")
        return EXIT_RUNTIME
    for line in result.skipped[:10]:
        _error(f"skipped a bad line: {line}")
    if len(result.skipped) > 10:
        _error(f"skipped {len(result.skipped) - 10} more bad lines")
    shown = 0
    for d in result.decisions:
        if d.suppressed and not args.all:
            continue
        print(json.dumps(d.record(), allow_nan=False) if args.json else format_decision(d))
        shown += 1
    line = nothing_decided(result, shown)
    if line is not None:
        print(line, file=sys.stderr if args.json else sys.stdout)  # --json: stdout stays JSON lines
    return EXIT_OK


def run_init(args: argparse.Namespace) -> int:
    try:
        done = write_commented(AgentConfig, args.path, INIT_HEADER, force=args.force)
    except FileExistsError as exc:
        _error(f"error: {exc}")
        return EXIT_RUNTIME
    except OSError as exc:
        _error(f"error: cannot write {args.path}: {exc.strerror or exc}")
        return EXIT_RUNTIME
    if done:
        print(done)
    return EXIT_OK


def run_keys(args: argparse.Namespace) -> int:
    try:
        paths = create_keys(args.dir, force=args.force)
    except KeysExistError as exc:
        _error(f"error: {exc}")
        return EXIT_RUNTIME
    except OSError as exc:
        _error(f"error: cannot write keys to {args.dir}: {exc.strerror or exc}")
        return EXIT_RUNTIME
    print(f"agent key pair:   {paths['server_public']}  {paths['server_secret']}")
    print(f"trainer key pair: {paths['client_public']}  {paths['client_secret']}")
    print(f"authorised trainer keys: {paths['authorized_dir']}/")
    print("agent.yaml:")
    curve = f"{{secret_file: {paths['server_secret']}, authorized_dir: {paths['authorized_dir']}}}"
    print(f"  commands: {{curve: {curve}}}")
    print(f"  stats_curve: {curve}")
    print("trainer (sentinel config):")
    trainer = f"{{secret_file: {paths['client_secret']}, server_public_file: {paths['server_public']}}}"
    print(f"  control: {{curve: {trainer}}}")
    print(f"  publish: {{curve: {trainer}}}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "replay":
        return run_replay(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "init":
        return run_init(args)
    if args.command == "grafana":
        return grafana_push.main(args)
    if args.command == "report":
        return report_command.main(args)
    return EXIT_USAGE  # unreachable: argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
