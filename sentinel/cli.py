"""``sentinel``: trainer-side tools.

Exit codes: 0 success; 1 runtime failure (for example the agent could not start);
2 usage or configuration error; 3 (audit) a check failed, e.g. a weight matrix without a role.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable
from typing import Any

EPILOG = "exit codes: 0 success, 1 runtime failure, 2 usage or configuration error"


def _bounded(kind: type, lo: float, hi: float | None = None, what: str = "") -> Callable[[str], Any]:
    """An argparse type: a ``kind`` in [lo, hi]; anything else is a usage error (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _demo(args: argparse.Namespace) -> int:
    from sentinel.demo import run_demo

    signal.signal(signal.SIGTERM, _terminate)  # stop the agent child too, as Ctrl-C does
    try:
        run_demo(
            steps=args.steps, lr=args.lr, metrics_port=args.metrics_port, seed=args.seed, inject_spike=args.inject_spike
        )
    except RuntimeError as exc:
        print(f"sentinel demo: {exc}", file=sys.stderr)
        return 1
    return 0


INIT_HEADER = """\
sentinel.yaml: the trainer side's configuration, written by `sentinel init`.
Every key is here with its default (leaving a key out gives the same) and why it exists.
Use it: sentinel.attach(model, optimizer, config="sentinel.yaml"); reference: docs/configuration.md"""


def _init(args: argparse.Namespace) -> int:
    from sentinel.config import Config
    from sentinel_contract.typedconfig import write_commented

    try:
        done = write_commented(Config, args.path, INIT_HEADER, force=args.force)
    except FileExistsError as exc:
        print(f"sentinel init: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"sentinel init: cannot write {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if done:
        print(done)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinel", description="Trainer-side tools of llm-sentinel.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a tiny GPT on CPU with a live agent and show what sentinel sees",
        description=(
            "Train examples/tiny_gpt.py (a small GPT on the Python standard library's source) on CPU, "
            "with sentinel attached and sentinel-agent started in the background. Prints the agent's "
            "/metrics address, a progress bar, and a summary."
        ),
        epilog=EPILOG,
    )
    demo.add_argument(
        "--steps",
        type=_bounded(int, 1, what="a number of steps (at least 1)"),
        default=500,
        help="training steps (default 500, about two minutes on 2 cores)",
    )
    demo.add_argument(
        "--lr",
        type=_bounded(float, 1e-12, 10.0, "a learning rate in (0, 10]"),
        default=1e-3,
        help="peak learning rate (default 1e-3)",
    )
    demo.add_argument(
        "--seed",
        type=_bounded(int, 0, what="a seed (0 or more)"),
        default=0,
        help="seed for model and data (default 0)",
    )
    demo.add_argument(
        "--metrics-port",
        type=_bounded(int, 0, 65535, "a TCP port (0-65535)"),
        default=0,
        help="agent /metrics port (default 0: any free port)",
    )
    demo.add_argument(
        "--inject-spike",
        action="store_true",
        help="corrupt 20 batches mid-run and watch the agent roll back to a good checkpoint and skip them",
    )
    demo.set_defaults(func=_demo)
    init = sub.add_parser(
        "init",
        help="write a commented sentinel.yaml with every key, its default and why",
        description="Write the trainer's configuration file with every key at its default, each after a comment "
        "saying what it does and what is allowed (generated from sentinel.config, as docs/configuration.md is).",
        epilog="exit codes: 0 written, 1 the file exists (use --force) or cannot be written, 2 usage error",
    )
    init.add_argument(
        "path", nargs="?", default="sentinel.yaml", help="file to write (default sentinel.yaml; - for stdout)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(func=_init)
    from sentinel.audit import add_audit_parser

    add_audit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
