"""Pre-clip gradient norms on two gloo ranks: FSDP2 measures them from its sharded hooks, DDP says it cannot.

Each rank (this file run as a script) trains the tiny GPT two ways with ``clip_grad_norm_(…, 0.01)``:
FSDP2-sharded, whose hooks run after the reduce-scatter on the rank's shard, so the published
``grad_norm`` must equal the pre-clip norm ``clip_grad_norm_`` returns; and DDP, where no hook is
registered (a hook would see the local gradient) and the published norm is the clipped one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


def _worker(rank: int, port: int, out: str) -> None:
    import logging

    import torch.distributed as dist
    from sentinel.examples.tiny_gpt import GPT, GPTConfig
    from sentinel.examples.torchrun_fsdp import sharded_gpt

    import sentinel

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=15)
    tokens = torch.randint(0, 256, (3, 4, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    models = {"fsdp": sharded_gpt(cfg, torch.device("cpu"), seed=0, dtype=torch.float64),
              "ddp": torch.nn.parallel.DistributedDataParallel(GPT(cfg).double())}  # fmt: skip
    report: dict = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sn = sentinel.attach(model, opt, run=name, publish={"enabled": False}, control={"enabled": False})
        rows = []
        for step in range(3):
            x = tokens[step, 2 * rank : 2 * rank + 2]
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            returned = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
            opt.step()
            rows.append({"returned": returned, "published": float(sn._pending[1]), "hooks": sn.grads is not None})
            opt.zero_grad()
            sn.observe(loss=loss)
        sn.close()
        report[name] = rows
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_fsdp2_publishes_the_pre_clip_norm_and_ddp_the_step_norm(tmp_path: Path) -> None:
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path

    with Ranks(HERE, tmp_path, log_dir=tmp_path, cwd=ROOT) as ranks:
        assert ranks.wait(120) == [0, 0], ranks.log()
        log = ranks.log()
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for row in report["fsdp"]:
            assert row["hooks"] and row["returned"] > 0.1  # clipped to 0.01: the clip acted
            assert row["published"] == pytest.approx(row["returned"], rel=1e-5)
        for row in report["ddp"]:
            assert not row["hooks"] and row["published"] == pytest.approx(0.01, rel=1e-3)
    assert "grad_norm=clip_grad_norm_" in log  # DDP: said once at INFO, with the remedy


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("out")
    a = parser.parse_args()
    _worker(a.rank, a.port, a.out)
