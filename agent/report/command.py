"""``sentinel-agent report``: the command line of run reports (agent/report/)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

DESCRIPTION = textwrap.fill(
    "Write a self-contained HTML report of a run from the agent's files alone: loss and gradient norm with "
    "every detection and action, per-layer heatmaps (update ratio; linear-output RMS and attention logits when "
    "probes ran), Adam ε and WeSaR gates when those transforms ran, the spike risk and ETAs, each trend "
    "detection with the curve it was fitted on and the limit it heads to, and a table of every event with its "
    "evidence. PATH is the agent's state directory (events.jsonl, stats-<run>.jsonl and "
    "its rotated files), the directory above it, or the files themselves. The PNGs are also written beside "
    "the HTML file.",
    width=100,
)

EPILOG = """exit codes:
  0  report written (panels whose statistics are missing are left out with a note)
  1  a PATH does not exist, the report cannot be written, or matplotlib is missing
  2  usage error

example:
  sentinel-agent report sentinel-agent-state --out report.html
"""


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report", help="write an HTML report of a run (needs the 'report' extra: matplotlib)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="state directory, events file or recordings")
    p.add_argument(
        "--out", type=Path, default=Path("report.html"), metavar="FILE", help="HTML file (default: report.html)"
    )
    p.add_argument("--run", metavar="NAME", help="only this run (default: every run found)")
    p.add_argument("--title", metavar="TEXT", help="page title")
    return p


def main(args: argparse.Namespace) -> int:
    from agent.report import MatplotlibMissing, ReportError, build_report

    try:
        result = build_report(args.paths, args.out, run=args.run, title=args.title)
    except (ReportError, MatplotlibMissing) as exc:
        print(f"sentinel-agent: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    for note in result.notes[:10]:
        print(f"sentinel-agent: note: {note}", file=sys.stderr)
    for left in result.panels_left_out:
        print(f"sentinel-agent: panel left out: {left}", file=sys.stderr)
    print(result.html)
    return EXIT_OK
