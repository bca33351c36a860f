"""A rollback commanded by an agent continues bit for bit like a fresh process resumed from the same checkpoint.

Two trainer processes (this file run as a script), real DCP checkpoints, a real ZeroMQ ROUTER
in the test as the agent:
  A trains, is told at step 15 to roll back (newest good checkpoint: step 12) and skip 3
    batches, and trains on to step 30;
  B is a fresh process that restores step-12, skips the same 3 batches, and trains to step 30.
The training draws from every generator sentinel restores: dropout (torch), a shuffled
DataLoader without a generator (torch's global one), numpy and Python ``random``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
ROLLBACK_AT, STEPS, SKIP = 14, 30, 3


def _train(mode: str, ckpt_dir: str, out: str, endpoint: str, marker: str, restore: str | None) -> None:
    import logging

    import sentinel

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=torch.Generator().manual_seed(1)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    sn = sentinel.attach(
        model,
        optimizer,
        lr_scheduler=schedule,
        run="bitwise",
        publish={"enabled": False},
        control={"enabled": mode == "rollback", "endpoint": endpoint},
        checkpoint={"dir": ckpt_dir, "every": 4, "good_after": 2, "keep": 10},
    )
    deadline = time.monotonic() + 20
    while mode == "rollback" and not sn.control.client.hellos and time.monotonic() < deadline:
        time.sleep(0.02)
        sn.control.client.hello(0, force=True)  # the test's agent must know this trainer before step 14
    if restore:
        while not (Path(restore) / ".good").exists() and time.monotonic() < deadline + 40:
            time.sleep(0.05)  # started beside A: wait until A's step-12 is good
        sn.checkpoints.restore(restore)
        sn.position.skip(SKIP, reason="same skips as the rollback")
    losses: list[dict[int, float]] = [{}, {}]  # before and after the rollback, by step
    trajectory = 0
    while sn.step < STEPS:
        for (x,) in sn.batches(loader):
            noise = float(np.random.rand()) * 1e-2 + random.random() * 1e-2
            loss = (model(x + noise) - x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            step = sn.step + 1
            losses[trajectory][step] = loss.item()
            sn.observe(loss=loss)
            if sn.step < step:
                trajectory = 1
            if mode == "rollback" and sn.step == ROLLBACK_AT and not sn.control.handled:
                Path(marker).write_text("at step")
                assert sn.control.client._sock.poll(20_000), "the agent's command never arrived"
            if sn.step >= STEPS:
                break
    torch.save(
        {
            "losses": losses,
            "params": [p.detach().clone() for p in model.parameters()],
            "adam": [dict(optimizer.state[p]) for p in model.parameters()],
            "lr": optimizer.param_groups[0]["lr"],
            "position": sn.position.state_dict(),
        },
        out,
    )
    sn.close()


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_rollback_then_continue_is_bitwise_equal_to_a_fresh_resume(tmp_path: Path) -> None:
    import zmq
    from fake_agent import bind_secured

    from agent.commands import Command, decode

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = bind_secured(router, tmp_path / "agent-keys")  # CURVE, advertised as the agent does
    marker = tmp_path / "at-step"
    a = _spawn("rollback", str(tmp_path / "a"), str(tmp_path / "a.pt"), endpoint, str(marker))
    step12 = str(tmp_path / "a" / "step-12")
    b = _spawn("resume", str(tmp_path / "b"), str(tmp_path / "b.pt"), "tcp://127.0.0.1:9", "", step12)
    try:
        peer = None
        deadline = time.monotonic() + 60
        while not marker.exists() or peer is None:
            assert time.monotonic() < deadline and a.poll() is None, a.stdout.read() if a.poll() is not None else ""
            if router.poll(50):
                peer, raw = router.recv_multipart()
        cmd = Command(id="rb-1", run="bitwise", action="rollback", args={"steps_back": 1, "skip": SKIP}, reason="spike")
        router.send_multipart([peer, cmd.encode()])
        acks = []
        while not acks:
            assert time.monotonic() < deadline, "no ack"
            if router.poll(100):
                msg = decode(router.recv_multipart()[1])
                if msg.__class__.__name__ == "Ack":
                    acks.append(msg)
        out_a, _ = a.communicate(timeout=60)
        assert a.returncode == 0, out_a
    finally:
        a.kill()
        if b.poll() is None and a.returncode != 0:
            b.kill()
        router.close()
        ctx.term()
    assert acks[0].status == "applied" and "to step-12" in acks[0].detail, acks[0]
    assert "restored checkpoint step-12" in out_a

    out_b, _ = b.communicate(timeout=60)
    assert b.returncode == 0, out_b

    ra, rb = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    before, after = ra["losses"]
    assert sorted(before) == list(range(1, ROLLBACK_AT + 2)) and sorted(after) == list(range(13, STEPS + 1))
    assert after == rb["losses"][0]  # every loss after the rollback, exactly
    assert all(torch.equal(x, y) for x, y in zip(ra["params"], rb["params"]))
    for sa, sb in zip(ra["adam"], rb["adam"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra["lr"] == rb["lr"]
    assert (ra["position"]["epoch"], ra["position"]["index"]) == (rb["position"]["epoch"], rb["position"]["index"])
    assert before[13] != after[13]  # the skipped batches made the repeated steps different


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("rollback", "resume"))
    parser.add_argument("ckpt_dir")
    parser.add_argument("out")
    parser.add_argument("endpoint")
    parser.add_argument("marker")
    parser.add_argument("restore", nargs="?")
    a = parser.parse_args()
    _train(a.mode, a.ckpt_dir, a.out, a.endpoint, a.marker, a.restore)
