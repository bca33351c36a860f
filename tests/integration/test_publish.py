"""The publisher over a real ZeroMQ socket on loopback: what it sends, and that it never blocks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import zmq
from fake_agent import bind_secured

import sentinel
from agent import protocol


@pytest.fixture
def pull(tmp_path):
    """A PULL socket playing the agent: CURVE, its keys advertised as the agent does (tests/fake_agent.py)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    bind_secured(sock, tmp_path / "keys")
    yield sock
    sock.close()
    ctx.term()


def _recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no message arrived"
    return sock.recv_multipart()


def test_messages_decode_with_the_agent_protocol(pull: zmq.Socket) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    sn = sentinel.attach(model, optimizer, run="pub-test", publish={"endpoint": endpoint}, stats={"every": 2})
    time.sleep(0.2)  # IMMEDIATE: the connection must be up before the first send
    layouts: dict = {}
    for step in range(3):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        optimizer.step()
        expected_matrix = sn._pending[0].clone() if sn._pending is not None else None
        optimizer.zero_grad()
        sn.observe(loss=loss, tokens=1234.0)
        msg = protocol.decode(_recv(pull), layouts, max_bytes=1 << 20)
        assert (msg.run, msg.rank, msg.step, msg.seq) == ("pub-test", 0, step, step + 1)
        assert msg.scalar("loss") == pytest.approx(loss.item(), rel=1e-6)
        assert msg.scalar("tokens") == 1234.0
        assert msg.scalar("lr") == pytest.approx(0.1)
        assert msg.scalar("adam_eps") == np.float32(1e-8)  # AdamW's default ε, every step
        if step % 2 == 0:
            assert msg.layout.tensors == ("weight", "bias") and msg.layout.roles == ("matrix", "bias")
            assert "update_ratio" in msg.layout.stats
            own = len(sn.stats.stats)  # the statistics, then the ε in force per tensor
            assert msg.layout.stats[own:] == ("adam_eps",)
            np.testing.assert_allclose(msg.matrix[:, :own], expected_matrix.numpy(), rtol=0)
            np.testing.assert_array_equal(msg.matrix[:, own], np.float32(1e-8))
            assert msg.scalar("grad_norm") > 0
        else:
            assert msg.layout.tensors == () and msg.scalar("grad_norm") is None
    assert len(layouts) == 2  # the statistics layout and the scalars-only one, each decoded once
    assert sn.counters["sent"] == 3 and sn.counters["dropped"] == 0
    sn.close()


def test_no_agent_means_counted_drops_not_waiting() -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    sn = sentinel.attach(model, optimizer, publish={"endpoint": "tcp://127.0.0.1:9"})
    start = time.perf_counter()
    for _ in range(200):
        sn.observe(loss=1.0)
    elapsed = time.perf_counter() - start
    assert sn.counters["dropped"] == 200 and sn.counters["sent"] == 0
    assert elapsed < 2.0, f"200 observe() calls with no agent took {elapsed:.2f} s"
    sn.close()


def test_full_queue_drops_instead_of_blocking(pull: zmq.Socket) -> None:
    """An agent that is connected but stops reading: the bounded queue fills, then sends drop."""
    pull.setsockopt(zmq.RCVHWM, 1)
    endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    sn = sentinel.attach(model, optimizer, publish={"endpoint": endpoint, "queue": 5})
    time.sleep(0.2)
    start = time.perf_counter()
    for _ in range(5000):
        sn.observe(loss=1.0)
    assert time.perf_counter() - start < 10.0
    assert sn.counters["dropped"] > 0
    assert sn.counters["sent"] + sn.counters["dropped"] == 5000
    sn.close()
