"""One rank's anomaly, seen by a real agent through rank 0 and acted on by every rank at one step.

Real pieces only: an agent subprocess on free loopback ports (CURVE, discovered keys), two
trainer processes (this file run as a script) in a gloo process group with DDP, sentinel's
default publishing (rank 0 only) and its job-level scalars, DCP checkpoints in a temp folder.

* NaN: rank 1 alone turns its loss into NaN at step ``NAN_AT``.  Rank 0's own loss stays finite,
  so only the job-level ``loss_max`` carries it; the agent's ``nonfinite`` rule must fire with
  rank 1 in its evidence, and the rollback it sends must be applied by both ranks at the same
  step, to the same checkpoint, leaving them with identical parameters.
* Slow rank: rank 1 sleeps after every optimizer step, and its statistics fail at step
  ``FAIL_AT``; the agent's export must name it as the slowest rank and the one with the errors,
  with no series of rank 1 at all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
RUN, NAN_AT, STEPS, SLOW_STEPS, SLEEP, FAIL_AT = "rank-anomaly", 10, 18, 6, 0.3, 2


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, port: int, mode: str, stats_ep: str, commands_ep: str, ckpt: str, out: str) -> None:
    import logging

    import torch.distributed as dist

    import sentinel

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.utils.data.TensorDataset(torch.randn(512, 8, generator=torch.Generator().manual_seed(1)))
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=2, rank=rank, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    sn = sentinel.attach(
        model,
        optimizer,
        run=RUN,
        publish={"endpoint": stats_ep},
        control={"endpoint": commands_ep},
        optim={"guard": {"enabled": True}},  # the NaN step itself is skipped on every rank
        checkpoint={"dir": ckpt, "every": 4, "good_after": 2, "keep": 10},
    )
    if rank == 0:
        while not sn.control.client.hellos:
            time.sleep(0.02)
            sn.control.client.hello(0, force=True)
    report: dict = {"rank": rank, "losses": {}, "digests": {}}
    trajectory = 0
    for (x,) in sn.batches(loader):
        loss = (model(x) - x).square().mean()
        if mode == "nan" and rank == 1 and sn.step == NAN_AT and trajectory == 0:
            loss = loss * math.nan  # this rank alone
        loss.backward()
        if mode == "slow" and rank == 1 and sn.step == FAIL_AT:
            sn.stats._local_norms = lambda dtype: 1 / 0  # this rank's statistics fail (training goes on)
        optimizer.step()
        optimizer.zero_grad()
        if mode == "slow" and rank == 1:
            time.sleep(SLEEP)
        report["losses"][f"{trajectory}:{sn.step}"] = loss.item()
        step = sn.step + 1
        sn.observe(loss=loss)
        if sn.step < step:
            trajectory = 1
            report["rolled_back"] = {"at": step, "to": sn.step}
        report["digests"][f"{trajectory}:{sn.step}"] = _digest(model)
        if mode == "nan" and rank == 0 and sn.step == NAN_AT + 1 and trajectory == 0:
            assert sn.control.client._sock.poll(60_000), "the agent's command never arrived"
        if sn.step >= (STEPS if mode == "nan" else SLOW_STEPS) and (trajectory == 1 or mode == "slow"):
            break
    report["commands"] = [e for e in sn.events if e.get("id")]
    report["final"] = {"step": sn.step, "digest": _digest(model)}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    sn.close()
    dist.destroy_process_group()


def _run(tmp_path: Path, agent, mode: str, timeout: float = 150.0) -> tuple[dict, dict, str]:
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path

    ckpt = tmp_path / "ckpt"
    with Ranks(HERE, mode, agent.stats_endpoint, agent.commands_endpoint, ckpt, tmp_path, log_dir=tmp_path) as ranks:
        codes = ranks.wait(timeout)
        text = ranks.log()
    assert codes == [0, 0], text + "\nagent:\n" + agent.log()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    return r0, r1, text


def test_a_nan_on_rank_1_alone_is_rolled_back_by_every_rank_at_one_step(tmp_path: Path, start_agent) -> None:
    from agent_proc import nonfinite_policy

    agent = start_agent(config=nonfinite_policy("rollback", steps_back=2, skip=1))
    r0, r1, text = _run(tmp_path, agent, "nan")
    assert math.isnan(r1["losses"][f"0:{NAN_AT}"]) and math.isfinite(r0["losses"][f"0:{NAN_AT}"])

    decisions = [e for e in agent.events() if e["type"] == "decision" and e["action"] == "rollback"]
    assert len(decisions) == 1, agent.events()
    d = decisions[0]
    assert (d["detector"], d["severity"], d["step"], d["rank"]) == ("nonfinite", "critical", NAN_AT, 0)
    assert d["evidence"]["rank"] == 1 and d["evidence"]["nonfinite_ranks"] == 1, d
    assert f"loss is nan on rank 1 at step {NAN_AT}" in d["reason"]
    assert f"on rank 1 at step {NAN_AT}" in agent.log()

    # every rank applied it, at the same step, with the same outcome and the evidence naming rank 1
    c0, c1 = r0["commands"], r1["commands"]
    assert len(c0) == len(c1) == 1 and c0 == c1, (c0, c1)
    applied = c0[0]
    assert applied["action"] == "rollback" and applied["status"] == "applied", applied
    assert applied["step"] == NAN_AT + 2  # rank 0 received it during step NAN_AT + 1; both applied it after
    assert "on rank 1" in applied["reason"]
    for r in (0, 1):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"rank{r} ") and "rollback(" in ln)
        assert f"at step {NAN_AT + 2}" in line and "loss is nan on rank 1" in line, line
    acks = [e for e in agent.events() if e["type"] == "ack" and e["id"] == applied["id"]]
    assert acks and acks[0]["status"] == "applied" and acks[0]["step"] == NAN_AT + 2

    assert r0["rolled_back"] == r1["rolled_back"] and r0["rolled_back"]["at"] == NAN_AT + 2
    assert r0["rolled_back"]["to"] < NAN_AT
    assert r0["final"] == r1["final"] and r0["final"]["step"] == STEPS
    assert r0["digests"] == r1["digests"]  # identical parameters at every step, both trajectories


def test_a_slow_rank_is_the_job_level_maximum_without_a_series_of_its_own(tmp_path: Path, start_agent) -> None:
    agent = start_agent()
    r0, r1, text = _run(tmp_path, agent, "slow")
    assert f"rank1 sentinel: stats.after_step failed at step {FAIL_AT}; now off" in text
    assert "rank0 sentinel: stats.after_step failed" not in text
    scrape = agent.wait_for(lambda s: s.value("sentinel_training_step", run=RUN, rank=0) == SLOW_STEPS - 1)
    assert scrape.value("sentinel_step_seconds_max_rank", run=RUN, rank=0) == 1
    slowest = scrape.value("sentinel_step_seconds_max", run=RUN, rank=0)
    fastest = scrape.value("sentinel_step_seconds_min", run=RUN, rank=0)
    assert slowest >= SLEEP and slowest - fastest >= 0.8 * SLEEP, (slowest, fastest)
    mean = scrape.value("sentinel_step_seconds_mean", run=RUN, rank=0)
    assert abs(mean - (slowest + fastest) / 2) < 1e-4
    assert scrape.value("sentinel_loss_nonfinite_ranks", run=RUN, rank=0) == 0
    assert scrape.value("sentinel_loss_max_rank", run=RUN, rank=0) in (0, 1)
    lo, hi = scrape.value("sentinel_loss_min", run=RUN, rank=0), scrape.value("sentinel_loss_max", run=RUN, rank=0)
    last = SLOW_STEPS - 1
    assert lo == pytest.approx(min(r0["losses"][f"0:{last}"], r1["losses"][f"0:{last}"]), rel=1e-6)
    assert hi == pytest.approx(max(r0["losses"][f"0:{last}"], r1["losses"][f"0:{last}"]), rel=1e-6)
    assert scrape.value("sentinel_trainer_errors_max", run=RUN, rank=0) >= 1
    assert scrape.value("sentinel_trainer_errors_max_rank", run=RUN, rank=0) == 1  # the failure is rank 1's
    ranks = {lab["rank"] for lab, _ in scrape.samples("sentinel_training_step") if lab["run"] == RUN}
    assert ranks == {"0"}  # one series for the job: rank 1 is seen through rank 0's aggregates only


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    for name in ("mode", "stats_ep", "commands_ep", "ckpt", "out"):
        parser.add_argument(name)
    a = parser.parse_args()
    _worker(a.rank, a.port, a.mode, a.stats_ep, a.commands_ep, a.ckpt, a.out)
