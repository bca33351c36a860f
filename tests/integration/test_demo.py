"""`sentinel demo` as a newcomer runs it: a real agent process, the tiny GPT, a summary."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_reports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", "--steps", "3"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"metrics at http://127\.0\.0\.1:\d+/metrics", result.stdout)
    summary = result.stdout.split("summary", 1)[1]
    assert re.search(r"steps trained\s+3\b", summary)
    assert re.search(r"messages sent / dropped\s+\d+ / \d+", summary)
    assert re.search(r"agent received / rejected\s+3 / 0", summary)  # the first messages are not lost
    assert re.search(r"ended\s+after 3 steps, as asked", summary)
    assert re.search(r"rolled back\s+nothing", summary)
    assert re.search(r"audit\s+(exit \d|did not finish)", summary)  # whatever the audit says, it is told
    assert re.search(r"set from the audit\s+\S", summary)
    assert "not reachable" not in result.stderr


def test_demo_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "demo", "--steps", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--steps" in result.stderr
