"""What keeps /metrics and the agent's memory bounded when every rank of a big job publishes:
per-tensor series from one rank per run (``export.tensor_ranks``), one-deep matrix history for
the ranks no predictor reads, and the benchmark that measures it (benchmarks/ranks.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from agent_proc import make_frames
from test_agent_metrics import Fixture

from agent.config import load_config
from agent.history import History

ROOT = Path(__file__).resolve().parents[2]
STATS, TENSORS = ("grad_l2", "update_ratio"), ("a.weight", "b.weight", "c.weight")


def _frames(rank: int, step: int = 1, run: str = "job") -> list[bytes]:
    matrix = np.full((len(TENSORS), len(STATS)), 1.0 + rank)
    return make_frames(run=run, rank=rank, step=step, scalars={"loss": 2.0 + rank}, stats=STATS, tensors=TENSORS,
                       matrix=matrix)  # fmt: skip


def _param_ranks(f: Fixture) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for lab, _ in f.scrape().samples("sentinel_param_grad_l2_norm"):
        out.setdefault(lab["run"], set()).add(lab["rank"])
    return out


def test_per_tensor_series_come_from_the_lowest_rank_of_each_run_by_default() -> None:
    f = Fixture()
    for rank in (3, 1, 2):
        f.send(_frames(rank))
    f.send(_frames(5, run="other"))
    assert _param_ranks(f) == {"job": {"1"}, "other": {"5"}}
    assert {lab["rank"] for lab, _ in f.scrape().samples("sentinel_loss") if lab["run"] == "job"} == {"1", "2", "3"}
    f.send(_frames(0))  # rank 0 arrives: it is the one exported from now on
    assert _param_ranks(f)["job"] == {"0"}
    assert f.scrape().value("sentinel_param_grad_l2_norm", run="job", rank=0, param="a.weight") == 1.0

    every = Fixture(**{"export.tensor_ranks": "all"})
    for rank in range(4):
        every.send(_frames(rank))
    assert _param_ranks(every) == {"job": {"0", "1", "2", "3"}}


def test_ranks_no_predictor_reads_keep_one_matrix() -> None:
    h = History.from_config(load_config())  # predict.ranks: zero
    for step in range(5):
        for rank in range(3):
            from agent.protocol import decode

            h.push(decode(_frames(rank, step), {}, max_bytes=1 << 20), float(step))
    r0, r1 = h.get("job", 0), h.get("job", 1)
    assert r0.matrix_depth == 1024 and r1.matrix_depth == 1  # history.steps for rank 0, the latest for the rest
    assert len(r0.tensor_stat("a.weight", "grad_l2")[0]) == 5 and len(r1.tensor_stat("a.weight", "grad_l2")[0]) == 1
    assert len(r1.scalar("loss")[0]) == 5  # scalars keep their history
    every = History.from_config(load_config(**{"predict.ranks": "all"}))
    from agent.protocol import decode

    every.push(decode(_frames(1), {}, max_bytes=1 << 20), 0.0)
    assert every.get("job", 1).matrix_depth == 1024


def test_benchmark_ranks_quick_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ranks.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"ranks=8 series=(\d+) scrape_p99_ms=(\d+) latency_p99_ms=(\d+) agent_rss_mib=(\d+)", last)
    assert m, last
    series = int(m.group(1))
    # 8 ranks x 32 tensors x 8 statistics would be 2,048 per-tensor series; one rank's are 256
    assert 256 < series < 256 + 8 * 40, series
    assert int(m.group(4)) > 0
