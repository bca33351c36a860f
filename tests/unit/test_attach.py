"""sentinel.attach: the public contract, and that it never changes training unless asked to."""

from __future__ import annotations

import logging

import pytest
import torch

import sentinel


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    return model, optimizer, schedule, data


def _train(sn_config: dict | None) -> list[torch.Tensor]:
    model, optimizer, schedule, data = _setup()
    sn = sentinel.attach(model, optimizer, config=sn_config) if sn_config is not None else None
    batches = sn.batches(data) if sn else data
    for x in batches:
        loss = (model(x) - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if sn:
            sn.observe(loss=loss)
    if sn:
        sn.close()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "config",
    [
        {"enabled": False},
        # statistics on, publishing to an address nobody listens on: still only reads
        {"publish": {"endpoint": "tcp://127.0.0.1:9"}},
        {"stats": {"update": "copy", "every": 2}, "publish": {"enabled": False}},
        # gradient hooks armed on some steps only, and the guard reading the pre-clip norm on every step
        {"stats": {"every": 3}, "optim": {"guard": {"enabled": True}}, "publish": {"enabled": False}},
    ],
    ids=["disabled", "stats-on-dead-agent", "copy-mode", "guard-and-gradient-hooks"],
)
def test_training_is_bitwise_identical_to_the_bare_loop(config: dict) -> None:
    bare = _train(None)
    attached = _train(config)
    for a, b in zip(bare, attached):
        assert torch.equal(a, b)


def test_disabled_installs_no_hooks() -> None:
    model, optimizer, _, _ = _setup()
    sn = sentinel.attach(model, optimizer, enabled=False)
    assert sn.stats is None and sn.publisher is None
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    sn.close()


def test_close_removes_hooks_and_context_manager_closes() -> None:
    model, optimizer, _, _ = _setup()
    with sentinel.attach(model, optimizer, publish={"enabled": False}) as sn:
        assert optimizer._optimizer_step_post_hooks
    assert not optimizer._optimizer_step_post_hooks
    sn.close()  # idempotent


def test_failing_statistics_never_crash_the_step(caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer, _, data = _setup()
    sn = sentinel.attach(model, optimizer, publish={"enabled": False})

    def broken(*args: object) -> None:
        raise RuntimeError("injected")

    sn.stats.after_step = broken
    with caplog.at_level(logging.ERROR, logger="sentinel"):
        for x in data[:3]:
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            sn.observe(loss=torch.tensor(1.0))
    assert sn.errors == 1 and sn.stats is None
    assert "injected" in caplog.text
    sn.close()


def test_state_dict_resumes_the_data_position() -> None:
    data = list(range(10))
    model, optimizer, _, _ = _setup()
    sn = sentinel.attach(model, optimizer, enabled=False)
    seen = []
    for b in sn.batches(data):
        seen.append(b)
        sn.observe()
        if len(seen) == 4:
            break
    state = sn.state_dict()
    assert state["step"] == 4 and state["data"] == {"epoch": 0, "index": 4}

    resumed = sentinel.attach(model, optimizer, enabled=False)
    resumed.load_state_dict(state)
    assert list(resumed.batches(data)) == data[4:]
    assert list(resumed.batches(data)) == data  # the next pass starts at the beginning
    assert resumed.state_dict()["data"] == {"epoch": 2, "index": 0}
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 99})


def test_config_errors_name_the_key(tmp_path) -> None:
    model, optimizer, _, _ = _setup()
    with pytest.raises(sentinel.ConfigError, match=r"stats\.every: 0 is out of range"):
        sentinel.attach(model, optimizer, stats={"every": 0})
    path = tmp_path / "s.yaml"
    path.write_text("publish:\n  queeu: 5\n")
    with pytest.raises(sentinel.ConfigError, match=r"publish\.queeu: unknown key"):
        sentinel.attach(model, optimizer, config=path)
    path.write_text("stats:\n  every: 5\n")
    sn = sentinel.attach(model, optimizer, config=path, run="yaml-run", stats__update="off", publish__enabled=False)
    assert (sn.config.stats.every, sn.config.stats.update, sn.run) == (5, "off", "yaml-run")
    assert "update_ratio" not in sn.stats.stats
    sn.close()


def test_skip_updates_leaves_parameters_and_optimizer_state_untouched() -> None:
    model, optimizer, _, data = _setup()
    sn = sentinel.attach(model, optimizer, stats={"enabled": False}, publish={"enabled": False})
    for x in data[:2]:
        (model(x) - x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    sn.skip_updates(2, reason="test")
    for x in data[2:4]:
        (model(x) - x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe()
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, model.parameters()))
    after = optimizer.state[next(model.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert sn.skipped_updates == 2
    (model(data[4]) - data[4]).square().mean().backward()
    optimizer.step()
    assert not torch.equal(params[0], next(model.parameters()).detach())
    sn.close()
