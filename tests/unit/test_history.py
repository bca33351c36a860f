"""History: fixed memory however many messages arrive, and the values come back in order."""

from __future__ import annotations

import numpy as np
import pytest
from agent_proc import make_frames

from agent.history import History, SeriesHistory
from agent.protocol import decode

LAYOUTS: dict = {}
TENSORS = ("w1", "w2", "w3")
STATS = ("grad_l2", "update_ratio")


def msg(step: int, *, run="r", rank=0, scalars=None, tensors=TENSORS, stats=STATS, matrix=None, **kw):
    if scalars is None:
        scalars = {"loss": float(step), "lr": 0.1}
    if matrix is None:
        matrix = (
            np.full((len(tensors), len(stats)), float(step))
            + np.arange(len(tensors) * len(stats)).reshape(len(tensors), len(stats)) / 100
        )
    frames = make_frames(
        run=run, rank=rank, step=step, scalars=scalars, tensors=tensors, stats=stats, matrix=matrix, **kw
    )
    return decode(frames, LAYOUTS, max_bytes=1 << 24)


def series(steps=16, max_matrix_bytes=1 << 20, max_scalar_names=8) -> SeriesHistory:
    return SeriesHistory("r", 0, steps=steps, max_matrix_bytes=max_matrix_bytes, max_scalar_names=max_scalar_names)


def test_memory_is_flat_under_ten_times_capacity():
    s = series(steps=16)
    s.push(msg(0), 0.0)
    nbytes = s.nbytes
    for step in range(1, 160):
        s.push(msg(step), float(step))
        assert s.nbytes == nbytes
    assert len(s) == 16 and s.total == 160
    steps, times = s.steps()
    np.testing.assert_array_equal(steps, np.arange(144, 160))
    np.testing.assert_array_equal(times, np.arange(144, 160, dtype=float))


def test_history_container_memory_is_flat_too():
    h = History(steps=16, max_series=4, max_matrix_bytes=1 << 20, max_scalar_names=8)
    for step in range(16):
        for rank in range(4):
            h.push(msg(step, rank=rank), 0.0)
    nbytes = h.nbytes
    for step in range(16, 160):
        for rank in range(4):
            h.push(msg(step, rank=rank), 0.0)
    assert h.nbytes == nbytes and len(h) == 4


def test_latest_values():
    s = series()
    for step in range(5):
        s.push(msg(step, sent=step + 1, dropped=step), 100.0 + step)
    assert s.latest_step == 4 and s.latest_received_at == 104.0
    assert s.latest_scalars() == {"loss": 4.0, "lr": pytest.approx(0.1)}
    tensors, stats, matrix, step = s.latest_matrix()
    assert (tensors, stats, step) == (TENSORS, STATS, 4)
    np.testing.assert_allclose(matrix[2, 1], 4.05)
    snap = s.snapshot()
    assert (snap.step, snap.sent, snap.dropped, snap.scalars["loss"]) == (4, 5, 4, 4.0)


def test_last_n_values_of_a_scalar_and_of_a_tensor_stat():
    s = series(steps=16)
    for step in range(40):
        s.push(msg(step), 0.0)
    steps, values = s.scalar("loss", last=5)
    np.testing.assert_array_equal(steps, np.arange(35, 40))
    np.testing.assert_array_equal(values, np.arange(35, 40, dtype=np.float32))
    steps, values = s.tensor_stat("w2", "update_ratio", last=3)
    np.testing.assert_array_equal(steps, [37, 38, 39])
    np.testing.assert_allclose(values, np.array([37, 38, 39]) + 0.03, rtol=1e-6)
    assert len(s.scalar("loss")[0]) == 16
    assert len(s.scalar("loss", last=0)[0]) == 0
    assert len(s.scalar("loss", last=100)[0]) == 16


def test_unknown_names_give_empty_series():
    s = series()
    s.push(msg(0), 0.0)
    assert len(s.scalar("nope")[1]) == 0
    assert len(s.tensor_stat("nope", "grad_l2")[1]) == 0
    assert len(s.tensor_stat("w1", "nope")[1]) == 0


def test_absent_scalar_is_skipped_not_nan():
    s = series()
    s.push(msg(0, scalars={"loss": 1.0, "aux": 5.0}), 0.0)
    s.push(msg(1, scalars={"loss": 2.0}), 0.0)
    s.push(msg(2, scalars={"aux": np.nan, "loss": 3.0}), 0.0)
    steps, values = s.scalar("aux")
    np.testing.assert_array_equal(steps, [0, 2])
    assert values[0] == 5.0 and np.isnan(values[1])
    np.testing.assert_array_equal(s.scalar("loss")[1], [1.0, 2.0, 3.0])
    assert s.latest_scalars()["loss"] == 3.0 and np.isnan(s.latest_scalars()["aux"])


def test_absent_scalar_after_wrap_around_leaves_no_stale_values():
    s = series(steps=16)
    for step in range(16):
        s.push(msg(step, scalars={"loss": 1.0, "aux": 2.0}), 0.0)
    for step in range(16, 30):
        s.push(msg(step, scalars={"loss": 1.0}), 0.0)
    np.testing.assert_array_equal(s.scalar("aux")[0], [14, 15])


def test_nonfinite_values_are_stored_and_counted():
    s = series()
    s.push(msg(0, scalars={"loss": np.inf}, matrix=[[np.nan, 1], [2, 3], [-np.inf, 4]]), 0.0)
    assert s.nonfinite_values == 3
    assert np.isposinf(s.scalar("loss")[1][0])
    assert np.isnan(s.tensor_stat("w1", "grad_l2")[1][0])


def test_layout_change_resets_the_matrix_ring_only():
    s = series()
    for step in range(5):
        s.push(msg(step), 0.0)
    s.push(msg(5, tensors=("w1", "w9")), 0.0)
    assert s.matrix_resets == 1
    np.testing.assert_array_equal(s.tensor_stat("w1", "grad_l2")[0], [5])
    assert len(s.tensor_stat("w3", "grad_l2")[0]) == 0
    np.testing.assert_array_equal(s.scalar("loss")[0], np.arange(6))
    s.push(msg(6, tensors=("w1", "w9"), stats=("grad_l2",)), 0.0)
    assert s.matrix_resets == 2


def test_message_without_matrix_keeps_the_matrix_ring():
    s = series()
    for step in range(3):
        s.push(msg(step), 0.0)
        s.push(msg(step, tensors=(), stats=()), 0.0)
    assert s.matrix_resets == 0
    np.testing.assert_array_equal(s.tensor_stat("w1", "grad_l2")[0], [0, 1, 2])
    assert len(s) == 6


def test_matrix_ring_depth_follows_the_byte_budget():
    row = len(TENSORS) * len(STATS) * 4
    s = series(steps=64, max_matrix_bytes=5 * row)
    for step in range(20):
        s.push(msg(step), 0.0)
    assert s.matrix_depth == 5
    np.testing.assert_array_equal(s.tensor_stat("w1", "grad_l2")[0], np.arange(15, 20))
    assert len(s.scalar("loss")[0]) == 20


def test_matrix_larger_than_budget_keeps_the_latest_one():
    s = series(max_matrix_bytes=1)
    s.push(msg(0), 0.0)
    s.push(msg(1), 0.0)
    assert s.matrix_depth == 1
    assert s.latest_matrix()[3] == 1


def test_scalar_names_are_bounded_but_known_names_always_kept():
    s = series(max_scalar_names=2)
    scalars = {
        "a": 1.0,
        "b": 2.0,
        "c": 3.0,
        "loss": 4.0,
        "grad_norm": 5.0,
        "lr": 6.0,
        "step_duration_seconds": 7.0,
    }
    assert s.push(msg(0, scalars=scalars), 0.0) is True
    assert s.push(msg(1, scalars=scalars), 0.0) is False
    assert set(s.scalar_names) == {"a", "b", "loss", "grad_norm", "lr", "step_duration_seconds"}
    assert set(s.latest_scalars()) == set(s.scalar_names)
    assert len(s.scalar("c")[0]) == 0


def test_scalar_order_change_maps_by_name():
    s = series()
    s.push(msg(0, scalars={"loss": 1.0, "lr": 0.5}), 0.0)
    s.push(msg(1, scalars={"lr": 0.25, "loss": 2.0}), 0.0)
    np.testing.assert_array_equal(s.scalar("loss")[1], [1.0, 2.0])
    np.testing.assert_array_equal(s.scalar("lr")[1], [0.5, 0.25])


def test_many_scalar_names_grow_columns_without_losing_values():
    s = series(steps=32, max_scalar_names=40)
    for step in range(30):
        s.push(msg(step, scalars={f"s{i}": float(step * 100 + i) for i in range(step + 1)}), 0.0)
    np.testing.assert_array_equal(s.scalar("s0")[1], np.arange(30) * 100.0)
    np.testing.assert_array_equal(s.scalar("s29")[0], [29])


def test_least_recently_updated_series_is_evicted():
    h = History(steps=16, max_series=2, max_matrix_bytes=1 << 20, max_scalar_names=8)
    assert h.push(msg(0, run="a"), 0.0).evicted is None
    assert h.push(msg(0, run="b"), 0.0).evicted is None
    h.push(msg(1, run="a"), 0.0)
    result = h.push(msg(0, run="c"), 0.0)
    assert result.evicted == ("b", 0)
    assert ("a", 0) in h and ("c", 0) in h and ("b", 0) not in h
    assert [s.run for s in h] == ["a", "c"]
    assert h.get("b", 0) is None and h.get("a", 0).latest_step == 1


def test_series_keyed_by_run_and_rank():
    h = History(steps=16, max_series=8, max_matrix_bytes=1 << 20, max_scalar_names=8)
    h.push(msg(0, run="a", rank=0), 0.0)
    h.push(msg(5, run="a", rank=1), 0.0)
    assert len(h) == 2 and h.get("a", 1).latest_step == 5 and h.get("a", 0).latest_step == 0


def test_push_result_counts_nonfinite_of_this_message():
    h = History(steps=16, max_series=8, max_matrix_bytes=1 << 20, max_scalar_names=8)
    assert h.push(msg(0, scalars={"loss": np.nan}), 0.0).nonfinite == 1
    assert h.push(msg(1), 0.0).nonfinite == 0
    assert h.get("r", 0).nonfinite_values == 1
