"""``benchmarks/precursor_onset.py``: the bound on any attention forecast's lead, as users run it.

A re-warmed LR (×100 over 10 steps from step 50) must start the attention-logit precursor after the
initial transient, and the script must say when, in its one parseable last line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rewarm_starts_the_logit_precursor_mid_run():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "precursor_onset.py"), "--steps", "70", "--lr", "3e-3",
           "--warmup", "20", "--rewarm", "50,10,100"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"logit_onset=(\d+|None) logit_watched=(\d+|None) diverged=(\d+|None) lead_bound=(-?\d+|None)", last
    )
    assert m, last
    onset, watched = int(m[1]), int(m[2])
    assert 50 <= onset <= 70 and onset <= watched  # the precursor starts with the re-warm, not before


def test_bad_rewarm_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precursor_onset.py"), "--rewarm", "oops"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "START,RAMP,FACTOR" in proc.stderr
