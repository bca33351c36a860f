"""Command line of the agent: ``sentinel-agent run`` (also ``python -m agent run``)."""

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

from agent import __version__
from agent.config import LOG_LEVELS, load_config
from agent.daemon import Agent, AgentStartError
from agent.typedconfig import ConfigError

logger = logging.getLogger("sentinel.agent")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

EPILOG = """\
exit codes:
  0  stopped cleanly (SIGTERM or SIGINT)
  1  runtime error, e.g. an address already in use
  2  usage or configuration error (the message names the key, the value and what is allowed)
"""

DESCRIPTION = (
    "The llm-sentinel sidecar agent: receives per-step training statistics from the trainer "
    "over ZeroMQ and exports them as Prometheus metrics."
)

RUN_DESCRIPTION = (
    "Run the agent in the foreground until SIGTERM or SIGINT. Options given here override "
    "the configuration file (docs/configuration.md lists every key)."
)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="sentinel-agent", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent", description=RUN_DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    run.add_argument("--config", type=Path, metavar="PATH", help="agent YAML configuration file")
    run.add_argument("--stats-endpoint", metavar="ENDPOINT", help="ZeroMQ endpoint to bind (tcp://127.0.0.1:*)")
    run.add_argument("--metrics-host", metavar="HOST", help="address of the /metrics HTTP server")
    run.add_argument("--metrics-port", type=int, metavar="N", help="port of the /metrics server (0: any)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default: info)")
    run.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="once both listeners are up, write JSON {pid, stats_endpoint, metrics_url} here (atomically)",
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    return EXIT_USAGE  # unreachable: argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
