"""sentinel.te without Transformer Engine: the FP8 weight-cache rule on a module with TE's caching
contract, and TE's debug statistics through the real nvdlfw_inspect into a real agent.

The contract (TE's ``is_first_microbatch``): None or True re-casts the weights, False reuses the
cached copy.  ``CachedLinear`` keeps that contract on CPU; tests/gpu/test_te_modules.py runs the same rule
on real TE modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sentinel
from sentinel.te import Fp8CacheRefresh, split_stat_name


class CachedLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        if is_first_microbatch is not False or not hasattr(self, "cache"):
            self.cache = self.weight.detach().to(torch.bfloat16)  # the "FP8" copy
        w = self.cache.float() + (self.weight - self.weight.detach())  # the cached value, the master's gradient
        return x @ w.t() + self.bias


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = CachedLinear(8, 8), CachedLinear(8, 8)

    def forward(self, x: torch.Tensor, first: bool | None) -> torch.Tensor:
        return self.b(self.a(x, is_first_microbatch=first), first)  # keyword and positional


def test_split_stat_name() -> None:
    assert split_stat_name("model.layers.1.self_attention.layernorm_qkv_activation_underflows%") == (
        "model.layers.1.self_attention.layernorm_qkv.activation",
        "te_underflows_pct",
    )
    assert split_stat_name("decoder.fc2_weight_cur_amax") == ("decoder.fc2.weight", "te_cur_amax")
    assert split_stat_name("oddname") == ("te", "te_oddname")


def _trained(tmp_path: Path, **optim) -> tuple[sentinel.Sentinel, Net, Fp8CacheRefresh]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sn = sentinel.attach(
        net,
        opt,
        publish={"enabled": False},
        control={"enabled": False},
        stats={"enabled": False},
        checkpoint={"dir": str(tmp_path), "every": 2, "good_after": 1},
        optim=optim,
    )
    sn.fp8_refresh = refresh = Fp8CacheRefresh(net, select=lambda m: isinstance(m, CachedLinear))
    x = torch.randn(4, 8)
    for _ in range(5):
        net(x, True).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sn.observe(loss=0.0)
    return sn, net, refresh


def test_after_a_restore_the_next_forward_recasts_once(tmp_path: Path) -> None:
    sn, net, refresh = _trained(tmp_path)
    x = torch.randn(4, 8)
    before = net(x, False).detach()  # caches hold the step-5 weights
    sn.checkpoints.restore(sn.checkpoints.latest_good())  # step-4 weights
    got = net(x, False).detach()  # the user still says "reuse the cache"
    assert refresh.forced == 2  # both modules, keyword and positional
    assert torch.equal(got, net(x, None)) and not torch.equal(got, before)
    with torch.no_grad():
        net.a.weight.add_(1.0)  # not sentinel's write: the user's False is respected
    assert torch.equal(net(x, False), got) and refresh.forced == 2
    sn.close()


def test_weights_written_by_the_clamp_mark_the_cache_stale(tmp_path: Path) -> None:
    sn, net, refresh = _trained(tmp_path / "clamp", clamp={"enabled": True, "default": 1e-4})
    assert refresh.forced == 0  # the loop passed True itself
    net(torch.randn(4, 8), False)
    assert refresh.forced == 2
    sn.close()


NVDLFW_CONFIG = """
sentinel_stats:
  enabled: True
  layers:
    layer_name_regex_pattern: .*
  LogTensorStats:
    enabled: True
    tensors: [activation]
    stats: [min, max, l2_norm]
    freq: 1
"""


def test_debug_statistics_reach_the_agent_through_nvdlfw_inspect(start_agent, tmp_path: Path) -> None:
    debug_api = pytest.importorskip("nvdlfw_inspect.api")
    from nvdlfw_inspect.logging import MetricLogger

    agent = start_agent()
    (tmp_path / "nv.yaml").write_text(NVDLFW_CONFIG)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn = sentinel.attach(
        model, opt, run="te-debug", publish={"endpoint": agent.stats_endpoint}, control={"enabled": False}
    )
    debug_api.initialize(
        str(tmp_path / "nv.yaml"), statistics_logger=sentinel.te.statistics_logger(sn), log_dir=str(tmp_path)
    )
    try:
        for it in range(3):
            x = torch.arange(4.0) * (it + 1)
            debug_api.log_tensor_stats(
                "decoder.layers.0.fc1", tensor=x, tensor_name="activation", iteration=it, skip_reduction=True
            )
            debug_api.step()
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            sn.observe(loss=1.0)
        scrape = agent.wait_for(
            lambda s: (
                s.value("sentinel_param_te_max", run="te-debug", rank="0", param="decoder.layers.0.fc1.activation")
                == 9.0
            )
        )
        assert scrape.value("sentinel_param_te_l2_norm", param="decoder.layers.0.fc1.activation") == pytest.approx(
            float(torch.linalg.vector_norm(torch.arange(4.0) * 3)), rel=1e-6
        )
    finally:
        sn.close()
        debug_api.end_debug()
        MetricLogger.enabled_loggers.clear()


def test_debug_stats_are_bounded_and_say_what_they_drop(caplog) -> None:
    from sentinel.te import DebugStats

    stats = DebugStats(max_rows=2, max_stats=2)
    for layer in ("l0", "l1", "l2"):
        for stat in ("min", "max", "std"):
            stats.log_scalar(f"{layer}_weight_{stat}", 1.0, 0)
    assert stats.dropped == 2 + 3  # l0/l1 lose std; l2 is a third row
    assert "dropped: over 2 statistics in row l0.weight" in caplog.text
    ((layout, matrix),) = stats.collect()
    assert layout.tensors == ("l0.weight", "l1.weight") and layout.stats == ("te_max", "te_min")
    assert matrix.tolist() == [1.0] * 4 and stats.collect() == []
