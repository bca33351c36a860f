"""A short run against an agent that is up: every message arrives, no false alarm, honest counters.

The publisher's socket uses ZeroMQ ``IMMEDIATE``: until the TCP connection is established a
send is refused.  The first message of a run leaves within microseconds of ``attach``, before
the connection has settled, so without a settling window it was dropped and announced as
"agent not reachable" while the agent was listening.
"""

from __future__ import annotations

import logging

import pytest
import torch

import sentinel


def _train(sn: sentinel.Sentinel, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe(loss=loss)


def test_twenty_steps_all_arrive_without_a_false_alarm(running_agent, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    caplog.set_level(logging.INFO, logger="sentinel")
    sn = sentinel.attach(
        model, optimizer, run="short", publish={"endpoint": running_agent.stats_endpoint}, control={"enabled": False}
    )
    for _ in range(5):  # no sleep after attach: the first messages go out at once
        sn.observe(loss=1.0)
    _train(sn, model, optimizer, 15)
    sn.close()
    assert "not reachable" not in caplog.text
    assert sn.counters == {"steps": 20, "sent": 20, "dropped": 0, "errors": 0}  # after close(), not zeros
    running_agent.wait_for(lambda s: s.value("sentinel_agent_received_messages_total") == 20, 10)


def test_counters_after_close_with_no_agent_still_count_the_drops() -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    sn = sentinel.attach(model, optimizer, publish={"endpoint": "tcp://127.0.0.1:9"}, control={"enabled": False})
    for _ in range(5):
        sn.observe(loss=1.0)
    sn.close()
    assert sn.counters["sent"] == 0 and sn.counters["dropped"] == 5
