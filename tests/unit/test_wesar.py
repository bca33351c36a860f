"""WeSaR through optimizer hooks equals WeSaR as a module reparameterisation, and Table 1's gates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.utils.parametrize as parametrize

from sentinel.optim.base import optimizer_params
from sentinel.optim.wesar import WeSaR, sigma_target


class Gate(torch.nn.Module):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(alpha, dtype=torch.float64))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.alpha * w


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
    ).double()


ROLES = {"0.weight": "up", "2.weight": "o", "4.weight": "down"}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_hooks_equal_the_parametrize_reference_after_20_steps(weight_decay: float) -> None:
    ours = _model()
    ref = copy.deepcopy(ours)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=weight_decay)
    params, _ = optimizer_params(opt)
    names = tuple(n for n, _ in ours.named_parameters())
    wesar = WeSaR(opt, params, names, ROLES, d=64, d_ffn=256, n_layers=2, init="keep")

    # Reference: W̄ = α·W as a parametrization, α and the actual W trained by the same AdamW.
    for name, alpha in zip(wesar.names, wesar.gates.detach().tolist()):
        module = ref[int(name.split(".")[0])]
        with torch.no_grad():
            module.weight.div_(alpha)
        parametrize.register_parametrization(module, "weight", Gate(alpha))
    gates = [p for n, p in ref.named_parameters() if n.endswith("alpha")]
    others = [p for n, p in ref.named_parameters() if not n.endswith("alpha")]
    ref_opt = torch.optim.AdamW(
        [{"params": others}, {"params": gates, "weight_decay": 0.0}], lr=1e-2, weight_decay=weight_decay
    )

    from sentinel.optim.base import StepContext

    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
        for model in (ours, ref):
            loss = (model(x) - x.flip(1)).square().mean()
            loss.backward()
        ctx = StepContext(step=step, params=params, names=names, group_of=[])
        wesar.before_step(ctx)
        opt.step()
        wesar.after_step(ctx)
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()

    for name, ours_alpha in wesar.gate_of().items():
        module = ref[int(name.split(".")[0])]
        ref_alpha = module.parametrizations.weight[0].alpha
        actual = module.parametrizations.weight.original
        assert ours_alpha.item() == pytest.approx(ref_alpha.item(), rel=1e-5)
        torch.testing.assert_close(ours.get_parameter(name), module.weight, rtol=1e-5, atol=0)
        torch.testing.assert_close(ours.get_parameter(name) / ours_alpha, actual, rtol=1e-5, atol=1e-12)
    for i in (0, 2, 4):  # biases, not reparameterised
        torch.testing.assert_close(ours[i].bias, ref[i].bias, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("d, n_layers", [(64, 2), (768, 12), (2048, 24), (5120, 40)])
def test_gates_follow_table_1_for_any_size(d: int, n_layers: int) -> None:
    sigma = math.sqrt(4e-5)
    assert sigma_target("embedding", d, 4 * d, n_layers) == 1.0
    for role in ("q", "k", "v", "qkv", "up", "head"):
        assert sigma_target(role, d, 4 * d, n_layers) == pytest.approx(math.sqrt(1 / d))
    assert sigma_target("o", d, 4 * d, n_layers) == pytest.approx(math.sqrt(1 / (2 * n_layers * d)))
    assert sigma_target("down", d, 4 * d, n_layers) == pytest.approx(math.sqrt(2 / (8 * n_layers * d)))

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"q": torch.nn.Linear(d, d, bias=False), "down": torch.nn.Linear(4 * d, d, bias=False)})
    if d > 1024:  # keep the test cheap: gates depend only on names and sizes
        model = torch.nn.ModuleDict(
            {"q": torch.nn.Linear(64, 64, bias=False), "down": torch.nn.Linear(64, 64, bias=False)}
        )
    opt = torch.optim.AdamW(model.parameters())
    params, _ = optimizer_params(opt)
    names = tuple(n for n, _ in model.named_parameters())
    wesar = WeSaR(
        opt, params, names, {"q.weight": "q", "down.weight": "down"}, d=d, d_ffn=4 * d, n_layers=n_layers, init="wesar"
    )
    gates = wesar.gate_of()
    assert gates["q.weight"].item() == pytest.approx(math.sqrt(1 / d) / sigma)
    assert gates["down.weight"].item() == pytest.approx(math.sqrt(2 / (8 * n_layers * d)) / sigma)
    # Every actual W ~ N(0, σ²) with the one common σ, and the module holds W̄ = αW.
    for name, alpha in gates.items():
        actual = model.get_parameter(name).detach() / alpha
        assert actual.std().item() == pytest.approx(sigma, rel=0.1)


def test_keep_leaves_the_function_unchanged_and_actual_std_is_sigma() -> None:
    model = _model()
    x = torch.randn(8, 16, dtype=torch.float64)
    before = model(x)
    opt = torch.optim.AdamW(model.parameters())
    params, _ = optimizer_params(opt)
    names = tuple(n for n, _ in model.named_parameters())
    wesar = WeSaR(opt, params, names, ROLES, d=64, d_ffn=256, n_layers=2, init="keep")
    assert torch.equal(model(x), before)
    for name, alpha in wesar.gate_of().items():
        actual = model.get_parameter(name).detach() / alpha
        assert actual.square().mean().sqrt().item() == pytest.approx(math.sqrt(4e-5), rel=1e-9)


def test_gate_learning_rate_follows_the_scheduler() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    params, _ = optimizer_params(opt)
    names = tuple(n for n, _ in model.named_parameters())
    wesar = WeSaR(opt, params, names, ROLES, d=64, d_ffn=256, n_layers=2, gate_lr_scale=2.0)
    from sentinel.optim.base import StepContext

    for step in range(3):
        model(torch.ones(2, 16, dtype=torch.float64)).sum().backward()
        ctx = StepContext(step=step, params=params, names=names, group_of=[])
        wesar.before_step(ctx)
        opt.step()
        wesar.after_step(ctx)
        assert wesar.gate_optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * opt.param_groups[0]["lr"])
        opt.zero_grad()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert len(opt.param_groups) == 1  # the user's optimizer keeps its groups: schedulers zip them strictly
