"""The optimizer transforms through sentinel.attach: what each must show (issue: stabilising wrappers)."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from sentinel.examples.tiny_gpt import GPTConfig, TrainConfig, make_run

import sentinel

SMALL = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)


def _tiny_gpt(steps: int, lr: float = 1e-3, seed: int = 0):
    torch.set_num_threads(2)
    return make_run(TrainConfig(steps=steps, batch_size=16, lr=lr, seed=seed), SMALL)


def _train_scaled(loss_scale: float, optim: dict, steps: int = 200) -> tuple[float, list[float]]:
    model, opt, sched, loader = _tiny_gpt(steps)
    sn = sentinel.attach(model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=optim)
    losses, eps = [], []
    for x, y in sn.batches(loader):
        _, loss = model(x, y)
        (loss * loss_scale).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        sn.observe(loss=loss)
        losses.append(loss.item())
        if "eps" in sn.chain.transforms:
            t = sn.chain.transforms["eps"]
            eps.append(float((t.user_eps / t.scale).max()))
    sn.close()
    return statistics.mean(losses[-50:]), eps


def test_eps_auto_tuning_rescues_a_loss_scaled_by_1e_minus_10() -> None:
    """Wortsman §3.4's regime on purpose: gradients 1e10 smaller leave √v̂ far below ε = 1e-8."""
    unscaled, _ = _train_scaled(1.0, {})
    stalled, _ = _train_scaled(1e-10, {})
    tuned, eps = _train_scaled(1e-10, {"eps": {"enabled": True}})
    assert stalled > 1.2 * unscaled, (stalled, unscaled)
    assert abs(tuned / unscaled - 1) < 0.01, (tuned, unscaled)
    assert max(eps) <= 1e-8 and min(eps) < 1e-12  # lowered, never raised past the optimizer's ε


def test_clamp_bounds_every_update_ratio_on_every_step() -> None:
    limit = 0.01
    model, opt, sched, loader = _tiny_gpt(40, lr=1e-2)
    sn = sentinel.attach(
        model,
        opt,
        publish={"enabled": False},
        stats={"enabled": False},
        optim={"clamp": {"enabled": True, "default": limit}},
    )
    clamp = sn.chain.transforms["clamp"]
    matrices = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    assert {sn._names[i] for i in clamp.index} == {n for n, _ in matrices}
    worst = 0.0
    for x, y in sn.batches(loader):
        before = [p.detach().clone() for _, p in matrices]
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        for (_, p), b in zip(matrices, before):
            worst = max(worst, ((p.detach() - b).norm() / b.norm()).item())
        opt.zero_grad()
        sched.step()
        sn.observe(loss=loss)
    assert worst <= limit * (1 + 1e-4), worst
    assert worst > 0.9 * limit  # the limit was reached, so the clamp really acted
    assert int(clamp.events) > 0 and sn.chain.scalars()["clamp_events"] == clamp.events
    assert any(e["action"] == "clamp" for e in sn.events)
    sn.close()


def test_clamp_without_adam_uses_the_copy_and_holds_the_bound() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sn = sentinel.attach(model, opt, publish={"enabled": False}, optim={"clamp": {"enabled": True, "default": 0.05}})
    for _ in range(5):
        before = [p.detach().clone() for p in model.parameters() if p.dim() == 2]
        model(torch.randn(8, 16)).square().sum().backward()
        opt.step()
        after = [p.detach() for p in model.parameters() if p.dim() == 2]
        assert max(((a - b).norm() / b.norm()).item() for a, b in zip(after, before)) <= 0.05 * (1 + 1e-5)
        opt.zero_grad()
        sn.observe()
    sn.close()


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_guard_skips_non_finite_gradients_and_leaves_state_untouched() -> None:
    model, opt = _mlp()
    sn = sentinel.attach(model, opt, publish={"enabled": False}, optim={"guard": {"enabled": True}})
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sn.observe()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    (model(torch.randn(4, 8)).square().mean() * float("nan")).backward()
    opt.step()
    opt.zero_grad()
    sn.observe()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(v[key], state[k][key]) for key in v)
    (event,) = [e for e in sn.events if e["action"] == "skip_update"]
    assert event["reason"] == "non-finite gradient" and event["step"] == 3
    assert sn.chain.scalars()["update_skips"] == 1.0
    sn.close()


@pytest.mark.parametrize("action", ["skip", "clip"])
def test_guard_acts_on_a_grad_norm_outlier_after_warmup(action: str) -> None:
    model, opt = _mlp()
    sn = sentinel.attach(
        model, opt, publish={"enabled": False}, optim={"guard": {"enabled": True, "action": action, "warmup": 10}}
    )
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        x = torch.randn(16, 8, generator=gen)
        factor = 1e3 if step == 20 else 1.0
        (model(x).square().mean() * factor).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == 20 and action == "skip":
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        opt.zero_grad()
        sn.observe()
    events = [e for e in sn.events if e["step"] == 20]
    assert (
        len(events) == 1
        and events[0]["z"] > 6
        and events[0]["action"] == ("skip_update" if action == "skip" else "clip")
    )
    assert all(e["step"] == 20 for e in sn.events)  # no false alarm on the ordinary steps
    sn.close()


ALL_FOUR = {
    "guard": {"enabled": True},
    "wesar": {"enabled": True, "init": "wesar"},
    "eps": {"enabled": True, "every": 3},
    "clamp": {"enabled": True, "default": 0.05},
}


def _run_all(steps: int, resume_from: dict | None = None, stop_after: int | None = None):
    model, opt, sched, loader = _tiny_gpt(steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sn = sentinel.attach(model, opt, publish={"enabled": False}, optim=ALL_FOUR)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["opt"])
        sched.load_state_dict(resume_from["sched"])
        scaler.load_state_dict(resume_from["scaler"])
        sn.load_state_dict(resume_from["sn"])
    saved = None
    for x, y in sn.batches(loader):
        _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        sn.observe(loss=loss)
        if stop_after is not None and sn.step == stop_after:
            saved = copy.deepcopy(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "sn": sn.state_dict(),
                }
            )
    sn.close()
    return model, opt, saved


def test_all_four_with_gradscaler_and_scheduler_resume_exactly() -> None:
    straight, opt, saved = _run_all(24, stop_after=12)
    assert len(opt.param_groups) == 1  # WeSaR's gates have their own AdamW: schedulers zip groups strictly
    resumed, _, _ = _run_all(24, resume_from=saved)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert saved["sn"]["optim"]["eps"]["tuned"] and "gates" in saved["sn"]["optim"]["wesar"]
