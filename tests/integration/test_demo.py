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


def test_sigterm_stops_the_demo_and_its_agent() -> None:
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "sentinel.cli", "demo", "--steps", "500"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        while line and "metrics at" not in line:
            line = proc.stdout.readline()
        url = re.search(r"metrics at (\S+)", line)[1]
        urllib.request.urlopen(url, timeout=5).read()  # the agent is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    deadline = time.monotonic() + 15
    while True:  # the agent child is gone too, not left listening
        try:
            urllib.request.urlopen(url, timeout=1).read()
        except OSError:
            break
        assert time.monotonic() < deadline, "the demo's agent outlived it"
        time.sleep(0.2)
