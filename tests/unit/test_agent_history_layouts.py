"""History keeps one matrix ring per layout: parameter statistics and probe statistics coexist."""

from __future__ import annotations

import numpy as np
from agent_proc import make_frames

from agent.history import SeriesHistory
from agent.protocol import decode

LAYOUTS: dict = {}
PARAMS = ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight")
PARAM_STATS = ("grad_l2", "update_ratio")
MODULES = ("h.0.attn", "h.0.mlp.c_proj")
PROBE_STATS = ("attn_logit_max", "out_rms")


def msg(step, tensors, stats, value):
    matrix = np.full((len(tensors), len(stats)), float(value))
    return decode(make_frames(step=step, scalars={"loss": 1.0}, tensors=tensors, stats=stats, matrix=matrix),
                  LAYOUTS, max_bytes=1 << 24)  # fmt: skip


def series(**kw) -> SeriesHistory:
    kw.setdefault("max_matrix_bytes", 1 << 20)
    return SeriesHistory("r", 0, steps=64, max_scalar_names=8, **kw)


def test_parameter_and_probe_statistics_keep_their_own_history():
    s = series()
    for step in range(10):
        s.push(msg(step, PARAMS, PARAM_STATS, step), 0.0)
        s.push(msg(step, MODULES, PROBE_STATS, 100 + step), 0.0)
    assert s.matrix_resets == 0 and len(s.layouts) == 2
    steps, values = s.tensor_stat("h.0.attn.c_attn.weight", "update_ratio")
    np.testing.assert_array_equal(steps, np.arange(10))
    np.testing.assert_array_equal(values, np.arange(10))
    steps, values = s.tensor_stat("h.0.attn", "attn_logit_max")
    np.testing.assert_array_equal(values, 100 + np.arange(10))
    [w] = s.stat_windows("out_rms", last=3)
    assert w.tensors == MODULES and w.values.shape == (3, 2)
    np.testing.assert_array_equal(w.steps, [7, 8, 9])
    snap = s.snapshot()
    assert [m.stats for m in snap.matrices] == [PARAM_STATS, PROBE_STATS]
    assert snap.stats == PROBE_STATS  # the latest layout, as before


def test_layouts_share_the_byte_budget_and_their_number_is_bounded():
    row = len(PARAMS) * len(PARAM_STATS) * 4
    s = series(max_matrix_bytes=20 * row, max_layouts=3)
    for step in range(30):
        s.push(msg(step, PARAMS, PARAM_STATS, step), 0.0)
    assert s.matrix_depth == 20 and s.matrix_nbytes == 20 * row
    s.push(msg(30, MODULES, PROBE_STATS, 0), 0.0)
    assert [len(s.tensor_stat(PARAMS[0], "grad_l2")[0]), s.matrix_depth] == [10, 10]
    np.testing.assert_array_equal(s.tensor_stat(PARAMS[0], "grad_l2")[0], np.arange(20, 30))  # newest kept
    assert s.matrix_nbytes <= 20 * row
    for i in range(5):
        s.push(msg(31 + i, (f"probe{i}",), ("x",), i), 0.0)
    assert len(s.layouts) == 3 and s.matrix_evictions == 4  # params, probes, probe0, probe1
    assert s.layouts[-1] == (("probe4",), ("x",))
    assert s.matrix_nbytes <= 20 * row


def test_layouts_too_big_to_share_the_budget_keep_only_the_latest():
    row = len(PARAMS) * len(PARAM_STATS) * 4
    s = series(max_matrix_bytes=row)
    s.push(msg(0, PARAMS, PARAM_STATS, 1), 0.0)
    s.push(msg(0, MODULES, PROBE_STATS, 2), 0.0)
    assert s.layouts == [(MODULES, PROBE_STATS)] and s.matrix_nbytes == row


def test_a_layout_sharing_a_cell_supersedes_the_old_one():
    s = series()
    s.push(msg(0, PARAMS, PARAM_STATS, 1), 0.0)
    s.push(msg(0, MODULES, PROBE_STATS, 2), 0.0)
    s.push(msg(1, (*PARAMS, "lm_head.weight"), PARAM_STATS, 3), 0.0)  # a parameter added
    assert s.matrix_resets == 1 and len(s.layouts) == 2
    np.testing.assert_array_equal(s.tensor_stat(PARAMS[0], "grad_l2")[0], [1])
    np.testing.assert_array_equal(s.tensor_stat("h.0.attn", "out_rms")[1], [2])
