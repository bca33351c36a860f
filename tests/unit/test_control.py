"""sentinel.control against a real ZeroMQ ROUTER on loopback playing the agent (agent.commands wire format)."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from fake_agent import bind_secured

import sentinel
from agent.commands import Ack, Command, Hello, decode


class Router:
    """The agent's side of the command channel, reduced to what a test needs: CURVE with keys it
    advertises as the agent does (tests/fake_agent.py), or the keys in ``curve_dir`` unadvertised."""

    def __init__(self, curve_dir: Path | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve_dir is not None:
            public, secret = zmq.auth.load_certificate(curve_dir / "server.key_secret")
            self.sock.curve_server = True
            self.sock.curve_secretkey, self.sock.curve_publickey = secret, public
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
            self.endpoint = f"tcp://127.0.0.1:{port}"
        else:
            self._keys = tempfile.TemporaryDirectory(prefix="sentinel-router-keys-")
            self.endpoint = bind_secured(self.sock, Path(self._keys.name) / "keys")
        self.peer: bytes | None = None
        self.hellos: list[Hello] = []
        self.acks: list[Ack] = []

    def pump(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(wait):
                return
            peer, raw = self.sock.recv_multipart()
            msg = decode(raw)
            self.peer = peer
            (self.hellos if isinstance(msg, Hello) else self.acks).append(msg)

    def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0, tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            if tick is not None:
                tick()
            self.pump(0.01)

    def send(self, cmd: Command | bytes) -> None:
        assert self.peer is not None, "no hello yet"
        self.sock.send_multipart([self.peer, cmd if isinstance(cmd, bytes) else cmd.encode()])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def router():
    r = Router()
    yield r
    r.close()


def _trainer(endpoint: str, tmp_path: Path | None = None, **extra):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    cfg = dict(run="ctl", publish={"enabled": False}, stats={"enabled": False}, **extra)
    cfg.setdefault("control", {})["endpoint"] = endpoint
    if tmp_path is not None:
        cfg["checkpoint"] = {"dir": str(tmp_path / "ckpt"), "every": 2, "good_after": 1}
    sn = sentinel.attach(model, optimizer, lr_scheduler=schedule, **cfg)
    return sn, model, optimizer, schedule


def _step(sn, model, optimizer, schedule=None) -> None:
    x = torch.randn(4, 8)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if schedule is not None:
        schedule.step()
    sn.observe(loss=loss)


def _connected(router: Router, sn, model, optimizer) -> None:
    router.wait_for(lambda: router.hellos, tick=lambda: _step(sn, model, optimizer))


def _cmd(id: str, action: str, run: str = "ctl", **args) -> Command:
    return Command(id=id, run=run, action=action, args=args, reason=f"test evidence for {id}")


def _apply_via_agent(router: Router, sn, model, optimizer, *cmds: Command) -> list[Ack]:
    _connected(router, sn, model, optimizer)
    before = len(router.acks)
    for c in cmds:
        router.send(c)
    router.wait_for(lambda: len(router.acks) >= before + len(cmds), tick=lambda: _step(sn, model, optimizer))
    return router.acks[before:]


def test_hello_on_connect_and_again_every_interval(router: Router) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint, control={"hello_interval": 0.2})
    _connected(router, sn, model, optimizer)
    assert router.hellos[0].run == "ctl" and router.hellos[0].rank == 0
    router.wait_for(lambda: len(router.hellos) >= 3, tick=lambda: _step(sn, model, optimizer))
    assert router.hellos[-1].step > router.hellos[0].step
    sn.close()


def test_a_duplicate_id_is_applied_once(router: Router) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint)
    data = list(range(100))
    batches = sn.batches(data)
    next(batches)
    acks = _apply_via_agent(router, sn, model, optimizer, _cmd("dup-1", "skip_batches", n=5))
    acks += _apply_via_agent(router, sn, model, optimizer, _cmd("dup-1", "skip_batches", n=5))
    assert [a.status for a in acks] == ["applied", "duplicate"]
    assert "applied" in acks[1].detail
    assert next(batches) == 6  # skipped 5 once, not 10
    assert sn.state_dict()["control"]["handled"][0][:2] == ["dup-1", "applied"]
    sn.close()


def test_a_command_for_another_run_is_acked_unknown_run_and_not_applied(router: Router) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint)
    acks = _apply_via_agent(router, sn, model, optimizer, _cmd("other-1", "stop", run="someone-else"))
    assert [a.status for a in acks] == ["unknown_run"]
    assert not sn.should_stop and sn.control.unknown_run == 1
    sn.close()


def test_invalid_messages_are_rejected_and_training_goes_on(router: Router, caplog) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint)
    _connected(router, sn, model, optimizer)
    router.send(b'{"v":1,"type":"command","id":"bad-1","run":"ctl","action":"lr_scale","args":{"factor":7}}')
    router.send(b"\x00not json")
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        router.wait_for(lambda: router.acks, tick=lambda: _step(sn, model, optimizer))
        for _ in range(3):
            _step(sn, model, optimizer)
    assert router.acks[0].status == "rejected" and "factor" in router.acks[0].detail
    assert sn.control.client.invalid == 2 and optimizer.param_groups[0]["lr"] == 0.1
    assert "invalid command message" in caplog.text
    sn.close()


def test_every_action_is_applied_and_logged_with_its_evidence(router: Router, caplog, tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(router.endpoint, tmp_path)
    for _ in range(4):
        _step(sn, model, optimizer, schedule)
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        acks = _apply_via_agent(
            router,
            sn,
            model,
            optimizer,
            _cmd("w", "warn"),
            _cmd("su", "skip_update", steps=2),
            _cmd("rb", "rollback", steps_back=100, skip=0),
        )
    assert [(a.id, a.status) for a in acks] == [("w", "applied"), ("su", "applied"), ("rb", "failed")]
    assert "no good checkpoint at step <=" in acks[2].detail
    for cid in ("w", "su", "rb"):
        assert f"test evidence for {cid}" in caplog.text
    assert sn.guard.pending_skips + sn.skipped_updates == 2
    sn.close()


def _adam_trainer(router: Router, tmp_path: Path, **checkpoint):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "eps": 1e-6}], lr=1e-3)
    cfg = {"run": "ctl", "publish": {"enabled": False}, "control": {"endpoint": router.endpoint},
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 2, "good_after": 1, **checkpoint}}  # fmt: skip
    return sentinel.attach(model, optimizer, **cfg), model, optimizer


def test_a_rollback_further_back_than_the_first_checkpoint_restores_the_oldest_good_one(
    router: Router, tmp_path: Path
) -> None:
    sn, model, optimizer = _adam_trainer(router, tmp_path, keep=100)
    for _ in range(4):
        _step(sn, model, optimizer)
    acks = _apply_via_agent(router, sn, model, optimizer, _cmd("rb", "rollback", steps_back=10_000, skip=0))
    assert acks[0].status == "applied", acks[0].detail
    assert "the oldest good one instead" in acks[0].detail and "to step-2;" in acks[0].detail
    sn.close()


def test_a_failing_action_is_acked_failed_and_never_raises(router: Router, monkeypatch) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint)

    def broken(n: int, reason: str = "") -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(sn.position, "skip", broken)
    acks = _apply_via_agent(
        router, sn, model, optimizer, _cmd("f1", "skip_batches", n=1), _cmd("r1", "rollback", steps_back=0, skip=0)
    )
    assert [(a.status, a.detail) for a in acks] == [
        ("failed", "RuntimeError: injected failure"),
        ("rejected", "checkpointing is off (checkpoint.dir is null): nothing to roll back to"),
    ]
    _step(sn, model, optimizer)  # still training
    assert sn.control.failed == 1
    sn.close()


def test_lr_scale_scales_the_groups_and_the_scheduler_keeps_its_shape(router: Router) -> None:
    sn, model, optimizer, schedule = _trainer(router.endpoint)
    ref_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(ref_optimizer, T_max=100)

    def tick() -> None:
        _step(sn, model, optimizer, schedule)
        ref_optimizer.step()
        reference.step()

    _connected(router, sn, model, optimizer)
    router.send(_cmd("lr", "lr_scale", factor=0.5))
    router.wait_for(lambda: router.acks, tick=tick)
    assert router.acks[0].status == "applied"
    for _ in range(20):
        tick()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * reference.get_last_lr()[0], rel=1e-9)
    assert schedule.base_lrs == [0.05] and sn.control.lr_factor == 0.5
    sn.close()


def test_eps_scale_lowers_every_groups_eps_and_survives_a_rollback(router: Router, tmp_path: Path) -> None:
    sn, model, optimizer = _adam_trainer(router, tmp_path)
    for _ in range(4):
        _step(sn, model, optimizer)
    acks = _apply_via_agent(router, sn, model, optimizer, _cmd("e", "eps_scale", factor=1e-3))
    assert acks[0].status == "applied" and "cumulative x0.001" in acks[0].detail
    assert [g["eps"] for g in optimizer.param_groups] == [pytest.approx(1e-11), pytest.approx(1e-9)]
    scaled_at = acks[0].step
    for _ in range(4):
        _step(sn, model, optimizer)
    back = sn.step - (scaled_at - 1)
    acks = _apply_via_agent(router, sn, model, optimizer, _cmd("rb", "rollback", steps_back=back, skip=0))
    assert acks[0].status == "applied" and int(acks[0].detail.rsplit("now at step ", 1)[1]) < scaled_at
    # the checkpoint holds the eps from before the command; the live factor is applied again
    assert [g["eps"] for g in optimizer.param_groups] == [pytest.approx(1e-11), pytest.approx(1e-9)]
    assert sn.state_dict()["control"]["eps_factor"] == pytest.approx(1e-3)
    sn.close()


def test_stop_ends_batches_and_sets_should_stop(router: Router) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint)
    _connected(router, sn, model, optimizer)
    router.send(_cmd("halt", "stop"))
    seen = 0
    for _ in sn.batches(range(10_000)):
        _step(sn, model, optimizer)
        router.pump(0.005)
        seen += 1
    assert sn.should_stop and seen < 10_000
    router.wait_for(lambda: router.acks)
    assert router.acks[0].status == "applied" and router.acks[0].step == sn.step
    sn.close()


@pytest.mark.parametrize("keys", ["advertised", "none"])
def test_a_dead_or_absent_agent_never_blocks_a_step(keys: str, tmp_path: Path) -> None:
    """An agent gone after advertising its keys (CURVE socket, nobody there), or never seen (no keys, no socket)."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as s:
        endpoint = bind_secured(s, tmp_path / "keys") if keys == "advertised" else None
        endpoint = endpoint or f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"
    sn, model, optimizer, _ = _trainer(endpoint, control={"hello_interval": 0.1})
    assert sn.control.client.security.ready == (keys == "advertised")
    costs = []
    for i in range(600):
        t = time.perf_counter()
        sn.observe(loss=torch.tensor(1.0))
        costs.append(time.perf_counter() - t)
        if i % 100 == 0:
            time.sleep(0.11)  # let hellos fall due, so retries are measured too
    assert statistics.median(costs) < 1e-3, statistics.median(costs)
    assert max(costs) < 0.05, max(costs)
    assert sn.control.client.hellos == 0
    sn.close()


def test_handled_ids_are_bounded_and_survive_state_dict(router: Router) -> None:
    sn, model, optimizer, _ = _trainer(router.endpoint, control={"remember": 16})
    for i in range(20):
        sn.control.apply(_cmd(f"id-{i}", "warn"))
    state = sn.state_dict()
    assert [h[0] for h in state["control"]["handled"]] == [f"id-{i}" for i in range(4, 20)]
    other, *_ = _trainer(router.endpoint)
    other.load_state_dict(state)
    assert other.control.apply(_cmd("id-19", "warn")).status == "duplicate"
    assert other.control.apply(_cmd("id-0", "warn")).status == "applied"  # forgotten: bounded memory
    other.close()
    sn.close()


def test_curve_encrypts_and_authenticates_the_channel(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(keys, "client")
    router = Router(curve_dir=keys)
    try:
        curve = {"secret_file": str(keys / "client.key_secret"), "server_public_file": str(keys / "server.key")}
        sn, model, optimizer, _ = _trainer(router.endpoint, control={"curve": curve})
        acks = _apply_via_agent(router, sn, model, optimizer, _cmd("c1", "warn"))
        assert acks[0].status == "applied"
        sn.close()
        # a trainer that does not hold the server's key never gets through, and never blocks
        zmq.auth.create_certificates(keys, "impostor")
        curve["server_public_file"] = str(keys / "impostor.key")
        sn, model, optimizer, _ = _trainer(router.endpoint, control={"curve": curve})
        for _ in range(20):
            _step(sn, model, optimizer)
            router.pump(0.01)
        assert len(router.hellos) == 1  # only the first trainer's
        sn.close()
    finally:
        router.close()


def test_config_refuses_an_unauthenticated_remote_endpoint() -> None:
    with pytest.raises(sentinel.ConfigError, match="control.endpoint.*not a loopback"):
        _trainer("tcp://10.1.2.3:5558", control={"insecure": True})
    with pytest.raises(sentinel.ConfigError, match="control.curve"):
        _trainer("tcp://127.0.0.1:5558", control={"curve": {"secret_file": "x"}})


def test_every_action_of_the_contract_has_exactly_one_handler_in_the_trainer() -> None:
    from sentinel.control import HANDLERS
    from sentinel_contract.actions import TABLE

    assert set(HANDLERS) == {a.name for a in TABLE}
    assert all(callable(h) for h in HANDLERS.values())
