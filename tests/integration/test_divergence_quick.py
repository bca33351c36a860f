"""The divergence zoo's quick subset, run as users run it: real training, real agents, real rollbacks.

``benchmarks/divergence.py --quick`` trains an attention-logit divergence, an LR fault, a bad-batch
region and a clean cosine run, each beside its stable twin and its noise twin, against three real
``sentinel-agent`` processes (advisory, default policy, prevention).  The full zoo and its table are
in docs/policy.md; this asserts what must never regress: the divergences with a precursor are warned
before their loss moves, nothing corrective happens to a clean run, and a clean run ends at low risk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_zoo_warns_in_time_and_leaves_clean_runs_alone(tmp_path):
    out = tmp_path / "zoo.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "divergence.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("recall=") and "false_actions=" in last and "prevented=" in last
    doc = json.loads(out.read_text())
    s, rows = doc["summary"], {r["scenario"]: r for r in doc["rows"]}
    assert s["divergent_with_precursor"] >= 2, rows  # the attention and the LR-fault runs really diverge
    assert s["recall"] == 1.0, rows
    for name in ("attn", "lr-jump"):
        assert rows[name]["first_warning"] <= rows[name]["diverged"], rows[name]  # before the loss moved
    assert rows["bad-random"]["first_warning"] == rows["bad-random"]["diverged"]  # no precursor: at once
    assert s["false_actions"] == 0 and s["false_warnings_per_1k"] <= 0.5
    assert doc["clean_risk"] and max(r for r in doc["clean_risk"] if r is not None) < 0.2
    assert rows["bad-random"]["reacted"] is True  # the default policy's rollback recovers a bad-batch region
