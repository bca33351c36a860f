"""benchmarks/host_syncs.py counts what it claims: one ``.item()`` per step is one host
synchronisation per step more than the same kernels without it, by both of its methods.

Skipped without CUDA; benchmarks/gpu_check.sh runs it with the rest of tests/gpu.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_an_item_per_step_is_one_host_sync_per_step_more() -> None:
    from benchmarks.host_syncs import count_host_syncs

    x = torch.randn(512, 512, device="cuda")

    def launches() -> None:
        (x @ x).relu_()

    def with_item() -> None:
        (x @ x).relu_().sum().item()

    launches(), with_item()
    quiet, loud = count_host_syncs(launches, 8), count_host_syncs(with_item, 8)
    assert "sync_debug_error" not in loud and "profiler_error" not in loud, loud
    assert quiet["sync_debug"] == 0, quiet
    assert loud["sync_debug"] - quiet["sync_debug"] == pytest.approx(1.0), (quiet, loud)
    assert loud["blocking_calls"] - quiet["blocking_calls"] == pytest.approx(1.0), (quiet, loud)
    assert loud["d2h_pageable"] + loud["d2h_pinned"] >= 1.0, loud
