"""The Adam ε in force is always published for Adam/AdamW: per tensor and as the scalar the agent reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_row_roles import attach_capturing


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _published(model, optimizer, steps: int = 3, **config) -> list:
    """(layout, scalars by name, per-tensor column dict) of every message."""
    sn, cap = attach_capturing(model, optimizer, **config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(16, 8, generator=gen)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe(loss=torch.tensor(1.0))
    sn.close()
    out = []
    for _, lay, data in cap.messages:
        n = len(lay.scalars)
        matrix = data[n:].reshape(len(lay.tensors), len(lay.stats))
        out.append((lay, dict(zip(lay.scalars, data[:n])), {s: matrix[:, j] for j, s in enumerate(lay.stats)}))
    return out


def test_default_adamw_publishes_its_eps_per_tensor_and_as_scalar() -> None:
    model = _model()
    msgs = _published(model, torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6))
    assert all(s["adam_eps"] == np.float32(1e-6) for _, s, _ in msgs)  # every step
    lay, _, cols = msgs[0]
    assert lay.stats.count("adam_eps") == 1
    np.testing.assert_array_equal(cols["adam_eps"], np.full(len(lay.tensors), 1e-6, dtype=np.float32))


def test_two_param_groups_give_each_tensor_its_own_eps() -> None:
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = torch.optim.Adam([{"params": first, "eps": 1e-15}, {"params": second, "eps": 1e-6}], lr=1e-3)
    msgs = _published(model, optimizer, steps=1)
    lay, scalars, cols = msgs[0]
    want = np.array([1e-15] * len(first) + [1e-6] * len(second), dtype=np.float32)
    np.testing.assert_array_equal(cols["adam_eps"], want)
    assert scalars["adam_eps"] == np.float32(1e-15)  # the smallest: the one √v̂ reaches first


def test_an_eps_changed_mid_run_is_published_from_then_on() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    sn, cap = attach_capturing(model, optimizer)
    for eps in (1e-8, 1e-10):
        optimizer.param_groups[0]["eps"] = eps
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe()
    sn.close()
    got = []
    for _, lay, data in cap.messages:
        got.append(data[lay.scalars.index("adam_eps")])
        col = data[len(lay.scalars) :].reshape(len(lay.tensors), -1)[:, lay.stats.index("adam_eps")]
        assert (col == got[-1]).all()
    assert got == [np.float32(1e-8), np.float32(1e-10)]


def test_with_the_tuner_on_the_column_is_the_tuned_eps() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)  # ≫ 1e-3 × RMS(√v̂): the tuner lowers it
    msgs = _published(model, optimizer, steps=4, optim={"eps": {"enabled": True, "every": 1}})
    lay, scalars, cols = msgs[-1]
    tuned = cols["adam_eps"]
    assert lay.stats.count("adam_eps") == 1
    assert (tuned < np.float32(1e-4)).all()  # not the group's 1e-3
    assert scalars["adam_eps"] == pytest.approx(float(tuned.min()), rel=1e-6)
    assert scalars["adam_eps_min"] == scalars["adam_eps"]
    assert scalars["adam_eps_max"] == pytest.approx(float(tuned.max()), rel=1e-6)


def test_not_adam_publishes_no_eps() -> None:
    model = _model()
    msgs = _published(model, torch.optim.SGD(model.parameters(), lr=1e-3), steps=1)
    lay, scalars, _ = msgs[0]
    assert "adam_eps" not in scalars and "adam_eps" not in lay.stats
