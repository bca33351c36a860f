"""Two ranks on gloo: an agent's rollback lands both on the same step with identical parameters.

Real pieces only: two trainer processes (this file run as a script) in a gloo process group,
DDP, a DistributedSampler, DCP checkpoints in a temp folder, and a ZeroMQ ROUTER in the test
as the agent; checkpoints saved synchronously and with dcp.async_save.  Before the command is sent, the test corrupts rank 1's file of the newest good
checkpoint (step-12): both ranks must agree to pass it over and restore step-8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
WAIT_AT, STEPS = 14, 20


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, port: int, ckpt_dir: str, endpoint: str, out_dir: str, async_save: bool) -> None:
    import logging

    import torch.distributed as dist

    import sentinel

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.utils.data.TensorDataset(torch.randn(512, 8, generator=torch.Generator().manual_seed(1)))
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=2, rank=rank, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    sn = sentinel.attach(
        model,
        optimizer,
        run="gloo-rollback",
        publish={"enabled": False},
        control={"endpoint": endpoint},
        checkpoint={"dir": ckpt_dir, "every": 4, "good_after": 2, "keep": 10, "async_save": async_save},
    )
    if rank == 0:
        while not sn.control.client.hellos:
            time.sleep(0.02)
            sn.control.client.hello(0, force=True)
    report: dict = {"rank": rank, "digests": {}}
    trajectory = 0
    for (x,) in sn.batches(loader):
        loss = (model(x) - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step = sn.step + 1
        sn.observe(loss=loss)
        if sn.step < step:
            trajectory = 1
            report["rolled_back"] = {"from": step, "to": sn.step, "digest": _digest(model)}
        report["digests"][f"{trajectory}:{sn.step}"] = _digest(model)
        if sn.step == WAIT_AT and trajectory == 0 and rank == 0:
            (Path(out_dir) / "at-step").write_text(str(sn.step))
            assert sn.control.client._sock.poll(30_000), "the agent's command never arrived"
        if sn.step >= STEPS and trajectory == 1:
            break
    report["final"] = {"step": sn.step, "digest": _digest(model), "position": sn.position.state_dict()["index"]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    sn.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_rollback_on_two_gloo_ranks_leaves_them_identical(tmp_path: Path, async_save: bool) -> None:
    import zmq
    from fake_agent import bind_secured
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path

    from agent.commands import Ack, Command, decode

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = bind_secured(router, tmp_path / "agent-keys")  # CURVE, advertised as the agent does
    ckpt = tmp_path / "ckpt"
    try:
        with Ranks(HERE, ckpt, endpoint, tmp_path, int(async_save), log_dir=tmp_path) as ranks:
            peer, deadline = None, time.monotonic() + 90
            while peer is None or not (tmp_path / "at-step").exists():
                assert time.monotonic() < deadline and ranks.running(), "workers did not get there"
                if router.poll(50):
                    peer, _ = router.recv_multipart()
            assert (ckpt / "step-12" / ".good").is_file()
            victim = ckpt / "step-12" / "__1_0.distcp"
            raw = bytearray(victim.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            victim.write_bytes(bytes(raw))
            cmd = Command(id="rb-gloo", run="gloo-rollback", action="rollback", args={"steps_back": 1, "skip": 2})
            router.send_multipart([peer, cmd.encode()])
            ack = None
            while ack is None:
                assert time.monotonic() < deadline, "no ack"
                if router.poll(100):
                    msg = decode(router.recv_multipart()[1])
                    ack = msg if isinstance(msg, Ack) else None
            assert ranks.wait(max(1.0, deadline - time.monotonic())) == [0, 0]
    finally:
        router.close()
        ctx.term()
    text = ranks.log()
    assert ack.status == "applied" and "to step-8" in ack.detail, (ack, text)
    assert "step-12 skipped" in text and "sha256" in text

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["rolled_back"]["from"] == r1["rolled_back"]["from"] == WAIT_AT + 1
    assert r0["rolled_back"]["to"] == r1["rolled_back"]["to"] == 8
    assert r0["rolled_back"]["digest"] == r1["rolled_back"]["digest"] == r0["digests"]["0:8"]  # step 8's parameters
    assert r0["digests"]["0:8"] != r0["digests"]["0:14"]
    assert r0["final"] == r1["final"] and r0["final"]["step"] == STEPS
    assert r0["digests"] == r1["digests"]  # identical at every step, both trajectories


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("ckpt_dir")
    parser.add_argument("endpoint")
    parser.add_argument("out_dir")
    parser.add_argument("async_save", type=int)
    a = parser.parse_args()
    _worker(a.rank, a.port, a.ckpt_dir, a.endpoint, a.out_dir, bool(a.async_save))
