"""The fused Adam/AdamW step (optim.fused: auto) equals the hook path, transform by transform and all four."""

from __future__ import annotations

import copy

import pytest
import torch
from sentinel.examples.tiny_gpt import GPT, GPTConfig

import sentinel

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
VARIANTS = {
    "wesar": {"wesar": {"enabled": True, "init": "wesar"}},
    "eps": {"eps": {"enabled": True, "every": 3}},
    "clamp": {"clamp": {"enabled": True, "default": 0.002}},
    "all": {
        "guard": {"enabled": True},
        "wesar": {"enabled": True, "init": "wesar"},
        "eps": {"enabled": True, "every": 3},
        "clamp": {"enabled": True, "default": 0.002},
    },
}


def _run(optim: dict, fused: str, steps: int, *, amsgrad: bool = False, adam: bool = False, stats: bool = False):
    torch.manual_seed(0)
    model = GPT(CFG).double()
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95), amsgrad=amsgrad)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    sn = sentinel.attach(
        model, opt, publish={"enabled": False}, stats={"enabled": stats}, optim={**optim, "fused": fused}
    )
    assert (sn.chain.fused is not None) == (fused == "auto")
    measured: list[torch.Tensor] = []
    if stats:
        after = sn.stats.after_step

        def record(*args, **kwargs):
            matrix, norm = after(*args, **kwargs)
            measured.append(matrix.detach().clone())
            return matrix, norm

        sn.stats.after_step = record
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=gen)
        _, loss = model(x, x.roll(1, 1))
        (loss * (1e-10 if "eps" in optim else 1.0)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        sn.observe(loss=loss)
    out = {"params": [p.detach().clone() for p in model.parameters()], "opt": opt.state_dict(), "sn": sn,
           "stats": measured}  # fmt: skip
    sn.close()
    return out


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-6 of the tensor's own scale: the kernel's grad scale 1/(α·s) is a float32, one rounding."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * scale)


def _assert_same(ref: dict, got: dict) -> None:
    for a, b in zip(ref["params"], got["params"]):
        _close(b, a)
    assert ref["opt"]["state"].keys() == got["opt"]["state"].keys()
    for k, st in ref["opt"]["state"].items():
        assert st.keys() == got["opt"]["state"][k].keys()
        for key, value in st.items():
            _close(got["opt"]["state"][k][key], value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_step_equals_the_hook_path(variant: str) -> None:
    ref = _run(VARIANTS[variant], "off", 12)
    got = _run(VARIANTS[variant], "auto", 12)
    _assert_same(ref, got)
    sn = got["sn"]
    if "clamp" in sn.chain.transforms:
        assert int(sn.chain.transforms["clamp"].events) > 0  # the clamp acted, so its fused form was exercised
    if "eps" in sn.chain.transforms:
        assert float(sn.chain.transforms["eps"].scale.max()) > 1e6
    if "wesar" in sn.chain.transforms:
        ours, theirs = sn.chain.transforms["wesar"].gates, ref["sn"].chain.transforms["wesar"].gates
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", ["wesar", "all"])
def test_statistics_of_the_fused_step_are_the_hook_paths(variant: str) -> None:
    """With statistics on, the fused step runs, and ‖W‖, ‖∂L/∂W‖, ‖ΔW‖, the update ratio and √v̂ it
    publishes are those of the actual W that the hook path publishes (not of the module's W̄ = α·W)."""
    ref = _run(VARIANTS[variant], "off", 10, stats=True)
    got = _run(VARIANTS[variant], "auto", 10, stats=True)
    _assert_same(ref, got)
    names = got["sn"].stats.stats
    assert len(got["stats"]) == len(ref["stats"]) == 10
    gates = got["sn"].chain.transforms["wesar"].gates
    assert float((gates - 1).abs().max()) > 0.1  # W̄ and W differ, so a statistic of W̄ would not pass
    for step, (a, b) in enumerate(zip(ref["stats"], got["stats"])):
        for k, name in enumerate(names):
            torch.testing.assert_close(b[:, k], a[:, k], rtol=1e-4, atol=1e-12, msg=f"{name} at step {step}")


@pytest.mark.parametrize("adam, amsgrad", [(False, True), (True, False)], ids=["adamw-amsgrad", "adam"])
def test_fused_step_with_amsgrad_and_with_adam(adam: bool, amsgrad: bool) -> None:
    optim = {"wesar": {"enabled": True, "init": "wesar"}, "clamp": {"enabled": True, "default": 0.002}}
    if not adam:
        optim["eps"] = {"enabled": True, "every": 3}
    _assert_same(_run(optim, "off", 8, adam=adam, amsgrad=amsgrad), _run(optim, "auto", 8, adam=adam, amsgrad=amsgrad))


def test_a_plain_adamw_loads_the_fused_runs_optimizer_state() -> None:
    got = _run(VARIANTS["all"], "auto", 3)
    torch.manual_seed(0)
    model = GPT(CFG).double()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    plain.load_state_dict(got["opt"])
    assert all(float(s["step"]) == 3 for s in plain.state.values())
    assert all(s["step"].device.type == "cpu" and s["step"].dim() == 0 for s in plain.state.values())


@pytest.mark.parametrize(
    "make, stats, reason",
    [
        (lambda m: torch.optim.AdamW(m.parameters()), "copy", "stats.update is 'copy'"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=1e-3), False, "not SGD"),
        (lambda m: torch.optim.AdamW(m.parameters(), capturable=True), False, "capturable=True"),
        (lambda m: torch.optim.AdamW(m.parameters(), fused=True), False, "fused=True"),
    ],
    ids=["stats", "sgd", "capturable", "fused"],
)
def test_fused_auto_keeps_the_hook_path_where_it_cannot_run_and_says_why(
    make, stats: bool | str, reason: str, caplog
) -> None:
    model = GPT(CFG)
    opt = make(model)
    with caplog.at_level("WARNING", logger="sentinel"):
        sn = sentinel.attach(
            model,
            opt,
            publish={"enabled": False},
            stats={"enabled": True, "update": stats} if isinstance(stats, str) else {"enabled": stats},
            optim={**VARIANTS["clamp"], "fused": "auto"},
        )
    assert sn.chain.fused is None
    assert reason in caplog.text
    if reason != "capturable=True":  # torch's capturable Adam needs a device to step at all
        model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
        before = model.lm_head.weight.detach().clone()
        opt.step()  # the optimizer's own step made the update, and the gradients are still there
        assert not torch.equal(model.lm_head.weight, before) and model.lm_head.weight.grad is not None
    sn.close()


def _run_scaled(fused: str, steps: int, resume_from: dict | None = None, stop_after: int | None = None):
    torch.manual_seed(0)
    model = GPT(CFG).double()  # float32 would differ in c_attn's key bias, whose gradient is rounding noise
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optim = {**VARIANTS["all"], "fused": fused}
    sn = sentinel.attach(model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=optim)
    if resume_from is not None:
        for obj, key in ((model, "model"), (opt, "opt"), (sched, "sched"), (scaler, "scaler"), (sn, "sn")):
            obj.load_state_dict(copy.deepcopy(resume_from[key]))
    gen = torch.Generator().manual_seed(1)
    saved = None
    for step in range(steps):
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=gen)
        if resume_from is not None and step < resume_from["step"]:
            continue
        _, loss = model(x, x.roll(1, 1))
        scaler.scale(loss * 1e-10).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        sn.observe(loss=loss)
        if step + 1 == stop_after:
            objs = {"model": model, "opt": opt, "sched": sched, "scaler": scaler, "sn": sn}
            saved = {"step": stop_after, **{k: copy.deepcopy(o.state_dict()) for k, o in objs.items()}}
    sn.close()
    return [p.detach().clone() for p in model.parameters()], saved


def test_fused_step_with_gradscaler_matches_the_hook_path_and_resumes_exactly() -> None:
    fused, saved = _run_scaled("auto", 10, stop_after=5)
    hooks, _ = _run_scaled("off", 10)
    for a, b in zip(hooks, fused):
        _close(b, a)
    resumed, _ = _run_scaled("auto", 10, resume_from=saved)
    for a, b in zip(fused, resumed):
        assert torch.equal(a, b)


def test_a_failing_fused_update_is_logged_and_the_hook_path_takes_over(monkeypatch, caplog) -> None:
    torch.manual_seed(0)
    model = GPT(CFG).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    optim = {**VARIANTS["all"], "fused": "auto"}
    sn = sentinel.attach(model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=optim)
    kernel, calls = torch._fused_adamw_, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", flaky)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(1))
    untouched = model.h[1].mlp.c_fc.weight.detach().clone()
    with caplog.at_level("ERROR", logger="sentinel"):
        for _ in range(3):
            model(x, x)[1].backward()
            opt.step()  # never raises into the loop
            opt.zero_grad()
            sn.observe()
    assert "the fused Adam step failed at step 0" in caplog.text and sn.errors == 1
    assert sn.chain.fused is None and not sn.chain.transforms["wesar"].fused
    assert len(calls) == 3  # later steps went through the optimizer's own step
    assert not torch.equal(model.h[1].mlp.c_fc.weight, untouched)  # and training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sn.close()
