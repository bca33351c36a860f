"""Pre-clip gradient norms (sentinel/gradnorms.py): what the statistics and the guard see behind clip_grad_norm_."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_row_roles import attach_capturing

import sentinel


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _batch(i: int, scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return torch.randn(16, 8, generator=gen) * scale, torch.randn(16, 4, generator=gen)


def _loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


def _scalars_and_columns(cap, step: int) -> tuple[dict, dict]:
    (lay, data) = [(lay, d) for s, lay, d in cap.messages if s == step and "grad_l2" in lay.stats][0]
    n = len(lay.scalars)
    matrix = data[n:].reshape(len(lay.tensors), len(lay.stats))
    return dict(zip(lay.scalars, data[:n])), {s: matrix[:, j] for j, s in enumerate(lay.stats)}


def test_published_norms_are_the_pre_clip_ones() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)
    returned, unclipped = [], []
    for i in range(3):
        _loss(model, _batch(i)).backward()
        unclipped.append([p.grad.norm().item() for p in model.parameters()])
        returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
        sn.observe()
    sn.close()
    assert min(returned) > 10  # the clip did act
    for step in range(3):
        scalars, cols = _scalars_and_columns(cap, step)
        assert scalars["grad_norm"] == pytest.approx(returned[step], rel=1e-5)
        assert scalars["grad_clip_factor"] == pytest.approx(1 / returned[step], rel=1e-5)
        np.testing.assert_allclose(cols["grad_l2"], unclipped[step], rtol=1e-5)
        numel = np.array([p.numel() for p in model.parameters()])
        np.testing.assert_allclose(cols["grad_rms"], np.array(unclipped[step]) / np.sqrt(numel), rtol=1e-5)


def test_unclipped_steps_publish_a_clip_factor_of_one() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)
    _loss(model, _batch(0, scale=1.0)).backward()
    total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))  # multiplies by 1: a new version
    opt.step()
    opt.zero_grad()
    sn.observe()
    _loss(model, _batch(1, scale=1.0)).backward()  # no clip at all
    opt.step()
    sn.observe()
    sn.close()
    first, _ = _scalars_and_columns(cap, 0)
    second, _ = _scalars_and_columns(cap, 1)
    assert first["grad_norm"] == pytest.approx(total, rel=1e-5) and first["grad_clip_factor"] == pytest.approx(1.0)
    assert second["grad_clip_factor"] == 1.0  # the gradients are the ones the hooks measured: exactly 1


def test_accumulated_micro_batches_give_the_norm_of_the_summed_gradient() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)
    sums, returned = [], []
    for step in range(2):
        for micro in range(2):
            (_loss(model, _batch(10 * step + micro)) / 2).backward()  # no zero_grad in between
        sums.append([p.grad.norm().item() for p in model.parameters()])
        returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
        sn.observe()
    sn.close()
    for step in range(2):
        scalars, cols = _scalars_and_columns(cap, step)
        np.testing.assert_allclose(cols["grad_l2"], sums[step], rtol=1e-5)
        assert scalars["grad_norm"] == pytest.approx(returned[step], rel=1e-5)


def test_gradscaler_hooks_are_unscaled_by_the_scaler_given_to_attach() -> None:
    published = {}
    for given in (True, False):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        sn, cap = attach_capturing(model, opt, **({"grad_scaler": scaler} if given else {}))
        returned = []
        for i in range(2):
            scaler.scale(_loss(model, _batch(i))).backward()
            scaler.unscale_(opt)
            returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            sn.observe()
        sn.close()
        published[given] = [_scalars_and_columns(cap, s)[0]["grad_norm"] for s in range(2)]
    np.testing.assert_allclose(published[True], returned, rtol=1e-5)  # the unscaled pre-clip norm
    np.testing.assert_allclose(published[False], np.array(returned) * 2.0**12, rtol=1e-5)  # the documented limit


def test_a_users_grad_norm_takes_precedence() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)
    _loss(model, _batch(0)).backward()
    opt.step()
    sn.observe(loss=torch.tensor(1.0), grad_norm=torch.tensor(123.0))
    sn.close()
    scalars, _ = _scalars_and_columns(cap, 0)
    assert scalars["grad_norm"] == 123.0


def test_the_guard_sees_an_excursion_that_clipping_hides() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    guard = {"enabled": True, "warmup": 10}
    sn = sentinel.attach(model, opt, publish={"enabled": False}, control={"enabled": False}, optim={"guard": guard})
    gen = torch.Generator().manual_seed(0)
    max_norm = None
    for step in range(25):
        loss = _loss(model, _batch(step, scale=1.0)) * (0.7 + 0.6 * torch.rand((), generator=gen))
        (loss * (1e3 if step == 20 else 1.0)).backward()
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf")))
        max_norm = max_norm or 1.5 * total  # ordinary steps stay below it; step 20 is clipped to it
        opt.step()
        opt.zero_grad()
        sn.observe()
    sn.close()
    (event,) = sn.events
    assert event["step"] == 20 and event["action"] == "skip_update" and event["reason"] == "grad-norm z-score"
    assert event["grad_norm"] > 100 * max_norm  # the pre-clip norm
    assert (max_norm - event["ema_mean"]) / event["ema_std"] < 6  # what the clipped norm would have scored


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or ()) for p in model.parameters())


def test_hooks_exist_only_for_the_backward_of_a_step_that_reads_them() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn = sentinel.attach(model, opt, publish={"enabled": False}, control={"enabled": False}, stats={"every": 3})
    seen = []
    for i in range(7):
        seen.append(_hooks(model))
        _loss(model, _batch(i)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sn.observe()
    n = len(list(model.parameters()))
    assert seen == [n, 0, 0, n, 0, 0, n]
    sn.close()
    assert _hooks(model) == 0
    guarded = sentinel.attach(model, opt, publish={"enabled": False}, control={"enabled": False},
                              stats={"every": 3}, optim={"guard": {"enabled": True}})  # fmt: skip
    for i in range(2):
        _loss(model, _batch(i)).backward()
        opt.step()
        opt.zero_grad()
        guarded.observe()
        assert _hooks(model) == n  # the guard reads every step
    guarded.close()


def test_a_gradient_assigned_after_backward_is_read_at_the_step() -> None:
    model = _model()
    model.register_parameter("extra", torch.nn.Parameter(torch.zeros(5)))  # not in the forward: no hook fires
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)
    _loss(model, _batch(0)).backward()
    first = model[0].weight
    backward_norm = first.grad.norm().item()
    first.grad = torch.ones_like(first)  # replaced after its hook fired: the hook's value stays the pre-clip one
    model.extra.grad = torch.full((5,), 2.0)
    opt.step()
    sn.observe()
    sn.close()
    scalars, cols = _scalars_and_columns(cap, 0)
    row = {name: i for i, name in enumerate(n for n, _ in model.named_parameters())}
    assert cols["grad_l2"][row["0.weight"]] == pytest.approx(backward_norm, rel=1e-5)
    assert cols["grad_l2"][row["extra"]] == pytest.approx(2 * 5**0.5, rel=1e-6)
    pre = np.sqrt(np.square(cols["grad_l2"]).sum())
    received = [p.grad.norm().item() for p in model.parameters()]
    assert scalars["grad_clip_factor"] == pytest.approx(np.linalg.norm(received) / pre, rel=1e-5)


def test_ddp_keeps_the_step_measurement_and_says_so(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from sentinel import collectives

    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="sentinel"):
        sn, cap = attach_capturing(model, opt)
    assert sn.grads is None and _hooks(model) == 0
    assert "post-clip" in caplog.text or "after any clipping" in caplog.text
    assert "grad_norm=clip_grad_norm_" in caplog.text
    _loss(model, _batch(0)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sn.observe()
    sn.close()
    scalars, _ = _scalars_and_columns(cap, 0)
    assert scalars["grad_norm"] == pytest.approx(1.0, rel=1e-4) and "grad_clip_factor" not in scalars


def test_a_failing_hook_turns_the_feature_off_and_never_the_training(monkeypatch, caplog) -> None:
    import sentinel.gradnorms as gradnorms

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn, cap = attach_capturing(model, opt)

    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected hook failure")

    monkeypatch.setattr(gradnorms, "local", broken)
    for i in range(2):
        _loss(model, _batch(i)).backward()
        opt.step()
        opt.zero_grad()
        sn.observe()
    sn.close()
    assert caplog.text.count("RuntimeError: injected hook failure") == 1 and sn.grads is None
    assert _hooks(model) == 0
    for step in range(2):  # statistics go on, read at the step
        assert _scalars_and_columns(cap, step)[0]["grad_norm"] > 0
