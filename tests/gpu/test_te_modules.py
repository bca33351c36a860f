"""Transformer Engine on a GPU: roles, statistics under FP8, and the FP8 weight-cache rule on real TE modules.

Skipped without CUDA or Transformer Engine; the CPU side of the same code is tests/unit/test_te.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

te = pytest.importorskip("transformer_engine.pytorch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import sentinel  # noqa: E402
from sentinel.roles import assign_roles  # noqa: E402
from sentinel.te import Fp8CacheRefresh  # noqa: E402


class Stack(torch.nn.ModuleList):
    def forward(self, x: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, is_first_microbatch=is_first_microbatch)
        return x


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Stack(te.TransformerLayer(128, 512, 4, layer_number=i + 1) for i in range(2)).cuda()


def test_transformer_layer_roles_are_complete() -> None:
    rm = assign_roles(_model())
    assert not rm.unassigned, rm.unassigned
    roles = rm.role_by_name()
    assert roles["0.self_attention.layernorm_qkv.weight"] == "qkv"
    assert roles["0.self_attention.proj.weight"] == "o"
    assert roles["0.layernorm_mlp.fc1_weight"] == "up" and roles["0.layernorm_mlp.fc2_weight"] == "down"


def test_statistics_under_fp8_come_from_the_master_weights(start_agent) -> None:
    agent = start_agent()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(32, 4, 128, device="cuda")
    with sentinel.attach(model, opt, run="te-gpu", publish={"endpoint": agent.stats_endpoint}) as sn:
        for _ in range(5):
            with te.fp8_autocast(enabled=True):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sn.observe(loss=loss)
    s = agent.wait_for(lambda s: s.value("sentinel_training_step", run="te-gpu", rank="0") == 4)
    ratio = s.value("sentinel_param_update_ratio", run="te-gpu", rank="0", param="0.layernorm_mlp.fc1_weight")
    assert ratio is not None and math.isfinite(ratio) and ratio > 0


def test_a_restore_recasts_the_fp8_weights_of_real_te_modules(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sn = sentinel.attach(
        model,
        opt,
        publish={"enabled": False},
        control={"enabled": False},
        checkpoint={"dir": str(tmp_path), "every": 2, "good_after": 1},
    )
    assert isinstance(sn.fp8_refresh, Fp8CacheRefresh) and sn.fp8_refresh.modules
    x = torch.randn(32, 4, 128, device="cuda")
    for _ in range(5):
        with te.fp8_autocast(enabled=True):
            model(x, is_first_microbatch=True).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        sn.observe(loss=0.0)
    sn.checkpoints.restore(sn.checkpoints.latest_good())
    with torch.no_grad(), te.fp8_autocast(enabled=True):
        got = model(x, is_first_microbatch=False)  # must not use the pre-restore FP8 copy
        fresh = model(x, is_first_microbatch=True)
    assert torch.equal(got, fresh)
    assert sn.fp8_refresh.forced > 0
    sn.close()
