"""DDP end to end: two gloo ranks train the tiny GPT, rank 0 publishes, a real agent exports.

Real pieces only: an agent subprocess on free loopback ports, two trainer processes (this file
run as a script) with DDP and sentinel's default publishing, and the same model trained in this
process on the whole global batch as the single-process reference.  What the agent exports
for every parameter and statistic at the last step must be the reference's statistics (float64
models; the wire carries float32), and only rank 0 may appear.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from agent.metrics import SCALAR_FAMILIES, STAT_FAMILIES

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
STEPS, RUN = 4, "ddp-e2e"


def _setup() -> tuple:
    from sentinel.examples.tiny_gpt import GPTConfig

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=15)
    tokens = torch.randint(0, 256, (STEPS, 4, cfg.block_size + 1), generator=torch.Generator().manual_seed(2))
    return cfg, tokens


def _train(model: torch.nn.Module, rows: slice, **sentinel_config: object) -> tuple[list, tuple, tuple]:
    """STEPS steps of AdamW with sentinel attached; the last step's statistics matrix, its row and column names."""
    import sentinel

    _, tokens = _setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=3e-4)
    sn = sentinel.attach(model, optimizer, run=RUN, control={"enabled": False}, **sentinel_config)
    last = None
    for step in range(STEPS):
        _, loss = model(tokens[step, rows, :-1], tokens[step, rows, 1:])
        loss.backward()
        optimizer.step()
        last = sn._pending[0].tolist()
        optimizer.zero_grad(set_to_none=True)
        sn.observe(loss=loss)
    names, stats = sn._names, sn.stats.stats
    sn.close()
    return last, names, stats


def _worker(rank: int, port: int, endpoint: str) -> None:
    import torch.distributed as dist
    from sentinel.examples.tiny_gpt import GPT

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg, _ = _setup()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(cfg).double())
    _train(model, slice(2 * rank, 2 * rank + 2), publish={"endpoint": endpoint})
    dist.destroy_process_group()


def test_ddp_statistics_reach_the_agent_from_rank_0_equal_to_one_process(start_agent: Callable, tmp_path: Path) -> None:
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path
    from sentinel.examples.tiny_gpt import GPT

    agent = start_agent()
    with Ranks(HERE, agent.stats_endpoint, log_dir=tmp_path, cwd=ROOT) as ranks:
        cfg, _ = _setup()
        torch.manual_seed(0)
        expected, names, stats = _train(GPT(cfg).double(), slice(None), publish={"enabled": False})
        codes = ranks.wait(90)
    assert codes == [0, 0], ranks.log()

    scrape = agent.wait_for(lambda s: s.value("sentinel_training_step", run=RUN, rank=0) == STEPS - 1)
    assert {lab["rank"] for lab, _ in scrape.samples("sentinel_training_step") if lab["run"] == RUN} == {"0"}
    assert scrape.value(SCALAR_FAMILIES["grad_norm"][0], run=RUN, rank=0) is not None
    assert len(stats) == 7 and "update_ratio" in stats
    for j, stat in enumerate(stats):
        metric = STAT_FAMILIES[stat][0]
        got = [scrape.value(metric, run=RUN, rank=0, param=f"module.{n}") for n in names]
        assert None not in got, (metric, got)
        want = torch.tensor([row[j] for row in expected], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-5, atol=1e-10, msg=metric)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("endpoint")
    a = parser.parse_args()
    _worker(a.rank, a.port, a.endpoint)
