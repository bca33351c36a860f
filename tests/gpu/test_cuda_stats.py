"""Statistics on CUDA: device-resident Adam step counters and the pinned, event-timed transfer.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch

import sentinel
from sentinel.publish import HostTransfer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": True}, {"capturable": True}])
def test_cuda_statistics_equal_direct_computation(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    sn = sentinel.attach(model, optimizer, publish={"enabled": False})
    for _ in range(4):
        model(torch.randn(32, 64, device="cuda")).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        matrix = sn._pending[0]
        assert matrix.device.type == "cuda"
        col = sn.stats.stats.index("update_ratio")
        expected = torch.stack([(p.detach() - b).norm() / b.norm() for p, b in zip(model.parameters(), before)])
        torch.testing.assert_close(matrix[:, col], expected.float(), rtol=1e-4, atol=0)
        optimizer.zero_grad()
        sn.observe(loss=torch.tensor(1.0, device="cuda"))
    sn.close()


def test_transfer_hands_over_only_completed_copies() -> None:
    transfer = HostTransfer()
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    out = transfer.submit(x, "a")
    torch.cuda.synchronize()
    out += transfer.submit(x * 2, "b")
    out += transfer.ready(wait=True)
    assert [tag for _, tag in out] == ["a", "b"]
    assert out[1][0][10] == 20.0
