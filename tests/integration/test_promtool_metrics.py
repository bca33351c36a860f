"""What a real agent serves on /metrics passes `promtool check metrics` without a single remark."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from agent_proc import Pusher, fetch, make_frames, require_binary

from agent.metrics import STAT_FAMILIES

pytestmark = pytest.mark.prometheus


def promtool_check(promtool: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def test_promtool_is_strict_enough_to_catch_a_bad_exposition():
    promtool = require_binary("promtool")
    result = promtool_check(promtool, "# HELP foo_seconds x\n# TYPE foo_seconds counter\nfoo_seconds 1\n")
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr


def test_agent_metrics_pass_promtool(running_agent):
    promtool = require_binary("promtool")
    stats = (*STAT_FAMILIES, "Latency-ms", "x_total", "fooBar", "a:b", "count")
    tensors = ("model.layers.0.attn.weight", 'odd "name"\\', "w")
    matrix = np.arange(len(tensors) * len(stats), dtype=float).reshape(len(tensors), len(stats))
    matrix[0, 0] = np.nan
    matrix[1, 1] = np.inf
    scalars = {
        "loss": np.nan,
        "grad_norm": 2.0,
        "step_duration_seconds": 0.1,
        "lr": 3e-4,
        "tokens_per_second": 1e5,
    }
    with Pusher(running_agent.stats_endpoint) as push:
        push.send(
            make_frames(run="run-1", rank=0, step=10, scalars=scalars, stats=stats, tensors=tensors, matrix=matrix)
        )
        push.send([b"not json", b"", b""])
        running_agent.wait_for(lambda s: s.value("sentinel_agent_received_messages_total") == 2)

    text = fetch(running_agent.metrics_url)
    assert 'sentinel_loss{rank="0",run="run-1"} NaN' in text
    assert "+Inf" in text
    for name, _ in STAT_FAMILIES.values():
        assert f"\n{name}{{" in text, name
    result = promtool_check(promtool, text)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
