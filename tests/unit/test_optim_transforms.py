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


def _train_scaled(loss_scale: float, optim: dict, steps: int = 150) -> tuple[float, list[float]]:
    losses, eps = _losses_scaled(loss_scale, optim, steps)
    return statistics.mean(losses[-50:]), eps


def _losses_scaled(loss_scale: float, optim: dict, steps: int) -> tuple[list[float], list[float]]:
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
    return losses, eps


@pytest.mark.slow
def test_eps_auto_tuning_rescues_a_loss_scaled_by_1e_minus_10() -> None:
    """Wortsman §3.4's regime on purpose: gradients 1e10 smaller leave √v̂ far below ε = 1e-8."""
    unscaled, _ = _train_scaled(1.0, {})
    stalled, _ = _train_scaled(1e-10, {})
    tuned, eps = _train_scaled(1e-10, {"eps": {"enabled": True}})
    assert stalled > 1.2 * unscaled, (stalled, unscaled)
    assert abs(tuned / unscaled - 1) < 0.01, (tuned, unscaled)
    assert max(eps) <= 1e-8 and min(eps) < 1e-12  # lowered, never raised past the optimizer's ε


def test_eps_auto_tuning_applies_from_the_first_update() -> None:
    """Step 0 has no Adam state: ε comes from the first gradient (v̂ = g²), so that update is not lost."""
    unscaled, _ = _losses_scaled(1.0, {}, steps=4)
    tuned, eps = _losses_scaled(1e-10, {"eps": {"enabled": True}}, steps=4)
    assert eps[0] < 1e-12  # lowered before the first update
    for step, (a, b) in enumerate(zip(unscaled, tuned)):  # with the user's ε the first update moved 0.4 % less
        assert b == pytest.approx(a, rel=1e-4), (step, a, b)


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


def test_clamp_skips_the_norm_while_its_lower_bound_holds_and_rereads_after_a_write() -> None:
    """‖W‖ ≥ (1 − lr·wd)‖W_prev‖ − lr·B·√n lets ordinary steps skip reading ‖W‖; a write to W ends that."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    limit = 0.05
    sn = sentinel.attach(model, opt, publish={"enabled": False}, optim={"clamp": {"enabled": True, "default": limit}})
    clamp = sn.chain.transforms["clamp"]
    gen = torch.Generator().manual_seed(0)
    read = []
    for step in range(8):
        if step == 5:
            with torch.no_grad():
                model[0].weight.mul_(1e-4)  # an outside write: the kept bound no longer holds
        before = [model[i].weight.detach().clone() for i in (0, 2)]
        model(torch.randn(16, 8, generator=gen)).square().mean().backward()
        opt.step()
        read.append(sorted(clamp._before_norm))
        for i, b in zip((0, 2), before):
            w = model[i].weight.detach()
            assert ((w - b).norm() / b.norm()).item() <= limit * (1 + 1e-4)
        for i, lower in clamp._lower.items():
            assert lower <= clamp.params[i].detach().norm().item()
        opt.zero_grad()
        sn.observe()
    assert read[0] == clamp.index  # first step: exact norms
    assert read[1:5] == [[]] * 4  # ordinary steps: no norm read, the bound proves the ratio
    assert read[5] == [clamp.index[0]]  # the written matrix is read again, the other is not
    assert read[6:] == [[clamp.index[0]]] * 2  # a clamped step leaves no bound: exact again
    clamped = [(e["step"], e["param"]) for e in sn.events if e["action"] == "clamp"]
    assert clamped == [(5, "0.weight"), (6, "0.weight"), (7, "0.weight")]  # the shrunken matrix, held to the max
    sn.close()


def test_chain_applies_wesar_alpha_and_eps_scale_as_one_factor_per_gradient() -> None:
    """α·s merged per tensor: each gradient ends as α·s·ḡ; where both are 1 it is left as it was."""
    from sentinel.optim.base import StepContext, optimizer_params
    from sentinel.optim.chain import Chain
    from sentinel.optim.eps import EpsTune
    from sentinel.optim.wesar import WeSaR

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params, group_of = optimizer_params(opt)
    names = tuple(n for n, _ in model.named_parameters())
    wesar = WeSaR(opt, params, names, {"0.weight": "up", "2.weight": "down"}, d=8, d_ffn=32, n_layers=1)
    eps = EpsTune(opt, params, group_of, every=1000)
    scale = torch.tensor([4.0, 1.0, 1.0, 16.0])  # 0.weight: gate and scale; 0.bias: neither; 2.bias: scale only
    eps.load_state_dict({"scale": scale, "calls": 1, "tuned": True})
    chain = Chain({"wesar": wesar, "eps": eps})
    model(torch.randn(4, 8)).square().mean().backward()
    raw = [p.grad.clone() for p in params]
    alpha = {wesar.index[k]: a for k, a in enumerate(wesar.gates.detach().tolist())}
    ctx = StepContext(step=0, params=params, names=names, group_of=group_of)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        chain.before_step(ctx)
    multiplies = sum(e.count for e in prof.key_averages() if e.key == "aten::_foreach_mul_")
    assert multiplies == 1  # α and s in one pass over the gradients (WeSaR's W̄ → W is a division)
    for i, (p, g) in enumerate(zip(params, raw)):
        expected = g * alpha.get(i, 1.0) * float(scale[i])
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=0)
    assert torch.equal(params[1].grad, raw[1])  # factor 1: untouched
    assert ctx.grad_factor is None


def test_guard_grad_norm_matches_the_foreach_norm_and_keeps_non_finite_results() -> None:
    from sentinel.optim.guard import grad_norm

    torch.manual_seed(0)
    grads = [torch.randn(300, 200) * 1e-3, torch.randn(77, dtype=torch.float64), torch.randn(5, 7).t()]
    reference = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))
    assert grad_norm(grads) == pytest.approx(reference, rel=1e-6)
    half = [g.to(torch.bfloat16) for g in grads[:1]]  # other dtypes take the foreach norm
    assert grad_norm(half) == pytest.approx(float(torch.linalg.vector_norm(half[0].float())), rel=1e-2)
    assert grad_norm([torch.tensor([1.0, float("nan")])]) != grad_norm([torch.tensor([1.0, float("nan")])])  # NaN
    assert grad_norm([torch.tensor([1.0, float("inf")])]) == float("inf")
    assert grad_norm([torch.tensor([1e25, 1.0])]) == float("inf")  # squares past float32: as the foreach norm says
