"""Per-tensor statistics against a direct computation on a small float64 model."""

from __future__ import annotations

import copy

import pytest
import torch

import sentinel


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    ).double()


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1),
    "adamw-foreach-nowd": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, fused=True),
    "adamw-forloop-amsgrad": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, foreach=False, amsgrad=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1),
    "adam-maximize": lambda p: torch.optim.Adam(p, lr=3e-3, maximize=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=3e-2, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_statistics_equal_direct_computation(name: str) -> None:
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    sn = sentinel.attach(model, optimizer, publish={"enabled": False})
    names = [n for n, _ in model.named_parameters()]
    assert sn.stats.names == tuple(names)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
        loss = model(x).square().mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
        matrix, grad_norm = sn._pending
        col = {s: matrix[:, i].double() for i, s in enumerate(sn.stats.stats)}
        for i, (p, b, g) in enumerate(zip(model.parameters(), before, grads)):
            ratio = (p.detach() - b).norm() / b.norm()
            assert col["update_ratio"][i].item() == pytest.approx(ratio.item(), rel=1e-6)
            assert col["update_l2"][i].item() == pytest.approx((p.detach() - b).norm().item(), rel=1e-6)
            assert col["param_l2"][i].item() == pytest.approx(b.norm().item(), rel=1e-6)  # W before the step
            assert col["grad_l2"][i].item() == pytest.approx(g.norm().item(), rel=1e-6)
            assert col["grad_rms"][i].item() == pytest.approx(g.square().mean().sqrt().item(), rel=1e-6)
            if "sqrt_v_rms" in col:
                state, group = optimizer.state[p], optimizer.param_groups[0]
                bc2 = 1 - group["betas"][1] ** state["step"].item()
                sqrt_v = (state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"] / bc2).sqrt()
                assert col["sqrt_v_rms"][i].item() == pytest.approx(sqrt_v.square().mean().sqrt().item(), rel=1e-6)
                frac = (sqrt_v < group["eps"]).double().mean().item()
                assert col["sqrt_v_below_eps_fraction"][i].item() == pytest.approx(frac, abs=1e-7)
        expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert grad_norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
        optimizer.zero_grad()
        schedule.step()
        sn.observe(loss=loss)
    sn.close()


def test_below_eps_fraction_sees_tiny_gradients() -> None:
    """Gradients far below ε (Wortsman §3.4's regime) show up as a fraction near 1."""
    model = _model().float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8)
    sn = sentinel.attach(model, optimizer, publish={"enabled": False})
    (model(torch.randn(16, 8)).square().mean() * 1e-12).backward()
    optimizer.step()
    col = sn.stats.stats.index("sqrt_v_below_eps_fraction")
    assert (sn._pending[0][:, col] > 0.99).all()
    sn.close()


def test_copy_mode_snapshot_only_on_statistics_steps() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sn = sentinel.attach(model, optimizer, publish={"enabled": False}, stats={"every": 3})
    assert sn.stats.mode == "copy"
    assert sn.stats.snapshot_bytes == sum(p.numel() * 8 for p in model.parameters())
    computed = []
    for _ in range(7):
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
        optimizer.step()
        computed.append(sn._pending is not None)
        optimizer.zero_grad()
        sn.observe()
    assert computed == [True, False, False, True, False, False, True]
    sn.close()


def test_reconstruct_refused_for_non_adam() -> None:
    model = _model()
    with pytest.raises(ValueError, match="reconstruct"):
        sentinel.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), stats={"update": "reconstruct"})


def test_chunking_gives_the_same_numbers() -> None:
    """Small chunks (bounded scratch memory) must not change any statistic."""
    results = []
    for chunk in (1 << 10, 1 << 25):
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sn = sentinel.attach(model, optimizer, publish={"enabled": False}, stats={"chunk_elements": chunk})
        for _ in range(3):
            model(torch.ones(4, 8, dtype=torch.float64)).square().sum().backward()
            optimizer.step()
            pending = copy.deepcopy(sn._pending[0])
            optimizer.zero_grad()
            sn.observe()
        results.append(pending)
        sn.close()
    # Device counters are float32 (as in torch's fused/capturable Adam), so β^t is float32 there.
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)


def test_param_norm_is_before_the_step_in_every_mode() -> None:
    for mode in ("off", "copy", "reconstruct"):
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sn = sentinel.attach(model, optimizer, publish={"enabled": False}, stats={"update": mode})
        model(torch.ones(4, 8, dtype=torch.float64)).square().sum().backward()
        before = torch.stack([p.detach().norm() for p in model.parameters()]).float()
        optimizer.step()
        col = sn.stats.stats.index("param_l2")
        torch.testing.assert_close(sn._pending[0][:, col], before, rtol=1e-6, atol=0)
        sn.close()


@pytest.mark.parametrize("name", ["adamw", "adam-l2"])
def test_device_step_counter_path_matches_the_host_path(name: str) -> None:
    """Fused/capturable Adam keeps `step` on the GPU; that branch must give the same numbers."""
    results = []
    for host_steps in (True, False):
        model = _model()
        optimizer = OPTIMIZERS[name](model.parameters())
        sn = sentinel.attach(model, optimizer, publish={"enabled": False})
        sn.stats.host_steps = host_steps
        for _ in range(3):
            model(torch.ones(4, 8, dtype=torch.float64)).square().sum().backward()
            optimizer.step()
            pending = sn._pending[0].clone()
            optimizer.zero_grad()
            sn.observe()
        results.append(pending)
        sn.close()
    # Device counters are float32 (as in torch's fused/capturable Adam), so β^t is float32 there.
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)


def test_below_eps_counts_agree_between_the_cpu_and_the_batched_paths() -> None:
    from sentinel.stats import below_counts

    g = torch.Generator().manual_seed(3)
    d = [torch.rand(shape, generator=g) * 2e-8 for shape in ((64, 32), (17,), (5, 5, 5))]
    limits = [1e-8, 0.5e-8, 1.5e-8]
    expected = [float((x < float(t)).sum()) for x, t in zip(d, limits)]
    for batched in (False, True):
        got = [float(c) ** 2 for c in below_counts(d, limits, batched=batched)]
        assert got == pytest.approx(expected, abs=1e-3), batched
    assert 0 < expected[0] < d[0].numel()  # the case is not trivial
