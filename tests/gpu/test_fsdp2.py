"""FSDP2 statistics on CUDA with NCCL: the shard reduction runs on the GPU, its failure flag through pinned memory.

One process, a one-rank NCCL mesh (the parameters are still DTensors, so the packed all-reduce
and the pinned read-back of the failure flag run for real).  Skipped without CUDA; the
two-rank equality checks are in tests/distributed/test_fsdp_stats.py (gloo).
"""

from __future__ import annotations

import pytest
import torch
from agent_proc import free_port

import sentinel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_sharded_statistics_on_nccl_equal_unsharded() -> None:
    import torch.distributed as dist
    from sentinel.examples.tiny_gpt import GPT, GPTConfig
    from sentinel.examples.torchrun_fsdp import sharded_gpt
    from torch.distributed.tensor.debug import CommDebugMode

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cuda = torch.device("cuda", 0)
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
        fsdp = sharded_gpt(cfg, cuda)
        torch.manual_seed(0)
        plain = GPT(cfg).to(cuda)
        tokens = torch.randint(0, 256, (3, 4, 17), device=cuda, generator=torch.Generator(cuda).manual_seed(1))
        runs = []
        for model in (fsdp, plain):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            runs.append(
                (model, opt, sentinel.attach(model, opt, publish={"enabled": False}, control={"enabled": False}))
            )
        assert runs[0][2].stats.shards is not None and runs[1][2].stats.shards is None
        for step in range(3):
            matrices = []
            for model, opt, sn in runs:
                model(tokens[step, :, :-1], tokens[step, :, 1:])[1].backward()
                with CommDebugMode() as comm:
                    opt.step()
                assert comm.get_total_counts() == (1 if model is fsdp else 0)
                matrices.append(sn._pending[0])
                assert matrices[-1].device.type == "cuda"
                opt.zero_grad(set_to_none=True)
                sn.observe()
            torch.testing.assert_close(matrices[0], matrices[1], rtol=1e-4, atol=1e-7)
        assert runs[0][2].stats.shards.failures() == 0
        assert runs[0][2].stats.shards._failed.is_pinned()
        for _, _, sn in runs:
            sn.close()
    finally:
        dist.destroy_process_group()
