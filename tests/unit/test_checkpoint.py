"""sentinel.checkpoint on real torch.distributed.checkpoint folders: what is saved, trusted, skipped and kept."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sentinel
from agent.commands import Command
from sentinel.checkpoint import BAD, GOOD, CheckpointError, manifest_name


def _trainer(tmp_path: Path, **checkpoint):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
    cfg = {"dir": str(tmp_path / "ckpt"), "every": 4, "good_after": 2, "keep": 10, **checkpoint}
    sn = sentinel.attach(
        model,
        optimizer,
        lr_scheduler=schedule,
        run="ckpt-test",
        publish={"enabled": False},
        control={"enabled": False},
        stats={"enabled": False},
        checkpoint=cfg,
    )
    return sn, model, optimizer, schedule


def _data(n: int = 64) -> list[torch.Tensor]:
    return [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _train(sn, model, optimizer, schedule, steps: int, data=None, nan_at: int | None = None) -> None:
    for x in sn.batches(data if data is not None else _data()):
        loss = (model(x) - x).square().mean()
        loss.backward()
        if sn.step == nan_at:
            next(model.parameters()).grad[0, 0] = float("nan")
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        sn.observe(loss=loss)
        if sn.step >= steps:
            break


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _saved_params(path: Path) -> dict[str, torch.Tensor]:
    """What a checkpoint folder holds for the model, read by DCP into fresh tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    target = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if k.startswith("app.model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(target, checkpoint_id=str(path), no_dist=True)
    return target


def test_restore_brings_back_model_optimizer_scheduler_rng_and_position(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path)
    _train(sn, model, optimizer, schedule, steps=8)
    params, lr, pos = _params(model), optimizer.param_groups[0]["lr"], sn.position.state_dict()
    adam = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.set_rng_state(torch.get_rng_state())  # no-op; the draws below must repeat after the restore
    _train(sn, model, optimizer, schedule, steps=11)
    assert not torch.equal(params[0], model[0].weight)

    path = tmp_path / "ckpt" / "step-8"
    # the draws after step 8 were made from the state the checkpoint holds
    assert sn.checkpoints.restore(path) == 8
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = optimizer.state[next(model.parameters())]
    assert all(torch.equal(adam[k], after[k]) for k in adam)
    assert optimizer.param_groups[0]["lr"] == lr and schedule.last_epoch == 8
    assert sn.step == 8 and sn.position.state_dict() == pos
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]
    sn.close()


def test_a_fresh_optimizer_is_restored_without_any_hook_seeing_a_step(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path)
    _train(sn, model, optimizer, schedule, steps=4)
    saved = _params(model)
    _train(sn, model, optimizer, schedule, steps=6)  # step-4 becomes good
    sn.close()

    fresh, model2, optimizer2, _ = _trainer(tmp_path)
    seen = []
    optimizer2.register_step_pre_hook(lambda *a: seen.append("pre"))
    assert fresh.checkpoints.resume() == 4
    assert seen == [] and fresh.skipped_updates == 0 and fresh.errors == 0
    assert all(torch.equal(a, b) for a, b in zip(saved, model2.parameters()))
    assert optimizer2.state[next(model2.parameters())]["step"] == 4
    fresh.close()


CORRUPTIONS = {
    "flipped-bytes": lambda p: _flip(next(p.glob("__0_*.distcp"))),
    "truncated": lambda p: _truncate(next(p.glob("__0_*.distcp"))),
    "no-metadata": lambda p: (p / ".metadata").unlink(),
    "no-manifest": lambda p: (p / manifest_name(0)).unlink(),
}


def _flip(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_passed_over_with_its_reason(
    tmp_path: Path, corrupt: str, caplog: pytest.LogCaptureFixture
) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path)
    _train(sn, model, optimizer, schedule, steps=14)
    root = tmp_path / "ckpt"
    assert (root / "step-12" / GOOD).is_file() and (root / "step-8" / GOOD).is_file()
    CORRUPTIONS[corrupt](root / "step-12")
    current = _params(model)

    with caplog.at_level(logging.WARNING, logger="sentinel"):
        assert sn.checkpoints.latest_good() == root / "step-8"
    expected = {"flipped-bytes": "sha256", "truncated": "bytes", "no-metadata": ".metadata", "no-manifest": "manifest"}
    assert "step-12 skipped" in caplog.text and expected[corrupt] in caplog.text

    with pytest.raises(CheckpointError, match="step-12"):
        sn.checkpoints.restore(root / "step-12")
    assert all(torch.equal(a, b) for a, b in zip(current, model.parameters()))  # untouched

    ack = sn.control.apply(Command(id="r1", run=sn.run, action="rollback", args={"steps_back": 0, "skip": 0}))
    assert ack.status == "applied" and "step-8" in ack.detail and sn.step == 8
    sn.close()


def test_an_injected_nan_gradient_never_reaches_a_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        _train(sn, model, optimizer, schedule, steps=20, nan_at=9)  # the update of step 10 is NaN
    assert not torch.isfinite(model[0].weight).all()
    root = tmp_path / "ckpt"
    folders = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name[5:]))
    assert [p.name for p in folders] == ["step-4", "step-8"]  # 12, 16, 20 were refused
    assert "step-12 NOT saved" in caplog.text
    assert (root / "step-4" / GOOD).is_file()
    assert (root / "step-8" / BAD).is_file() and not (root / "step-8" / GOOD).exists()  # NaN within its window
    for folder in folders:
        assert all(torch.isfinite(t).all() for t in _saved_params(folder).values())
    assert sn.checkpoints.latest_good() == root / "step-4"
    sn.checkpoints.restore(root / "step-4")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sn.close()


def test_retention_keeps_the_newest_good_and_never_trades_a_good_one_for_an_unproven_one(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path, keep=2)
    _train(sn, model, optimizer, schedule, steps=17)
    root = tmp_path / "ckpt"
    names = lambda: sorted((p.name for p in root.iterdir() if p.name.startswith("step-")), key=lambda n: int(n[5:]))
    assert names() == ["step-8", "step-12", "step-16"]  # 16 saved, not good yet: 8 and 12 both stay
    # a corrective command: 16 can never become good, so nothing older may be deleted for it
    sn.control.apply(Command(id="s1", run=sn.run, action="skip_batches", args={"n": 1}))
    assert (root / "step-16" / BAD).is_file()
    _train(sn, model, optimizer, schedule, steps=22)
    assert names() == ["step-12", "step-20"]  # 20 good: 8 (retention) and 16 (bad, older) deleted
    assert all((root / n / GOOD).is_file() for n in names())
    sn.close()


def test_saves_wait_for_the_first_update_and_the_window_is_clean_steps(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path, every=1, good_after=3)
    assert sn.checkpoints.save() is None  # no optimizer state yet: nothing worth saving
    _train(sn, model, optimizer, schedule, steps=3)
    root = tmp_path / "ckpt"
    assert not (root / "step-1" / GOOD).exists()
    _train(sn, model, optimizer, schedule, steps=4)
    assert (root / "step-1" / GOOD).is_file() and not (root / "step-2" / GOOD).exists()
    sn.close()


def test_async_saves_are_verified_and_restorable(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path, async_save=True)
    _train(sn, model, optimizer, schedule, steps=8)
    params = _params(model)
    _train(sn, model, optimizer, schedule, steps=11)
    path = sn.checkpoints.latest_good()
    assert path == tmp_path / "ckpt" / "step-8"
    sn.checkpoints.restore(path)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    sn.close()


def test_a_new_run_in_an_old_folder_never_rolls_back_onto_the_old_run(tmp_path: Path) -> None:
    old, model, optimizer, schedule = _trainer(tmp_path)
    _train(old, model, optimizer, schedule, steps=14)
    old.close()
    new, model, optimizer, schedule = _trainer(tmp_path)
    _train(new, model, optimizer, schedule, steps=5)
    assert new.checkpoints.latest_good() is None  # old step-4/8/12 are another trajectory's
    _train(new, model, optimizer, schedule, steps=6)
    assert new.checkpoints.latest_good() == tmp_path / "ckpt" / "step-4"  # its own, saved over the old one
    moved = list((tmp_path / "ckpt" / "superseded").iterdir())
    assert [p.name.split(".")[0] for p in moved] == ["step-4"]  # the old run's step-4 is kept aside, not deleted
    new.close()


def test_rollback_moves_the_abandoned_trajectory_aside(tmp_path: Path) -> None:
    sn, model, optimizer, schedule = _trainer(tmp_path)
    _train(sn, model, optimizer, schedule, steps=17)
    ack = sn.control.apply(Command(id="r", run=sn.run, action="rollback", args={"steps_back": 9, "skip": 2}))
    assert ack.status == "applied" and sn.step == 8
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-4", "step-8"]
    assert sorted(p.name.split(".")[0] for p in (root / "superseded").iterdir()) == ["step-12", "step-16"]
    _train(sn, model, optimizer, schedule, steps=14)  # step-12 of the new trajectory is good
    assert not any((root / "superseded").iterdir())
    shutil.rmtree(root)
    sn.close()


def test_a_parameter_that_never_had_a_gradient_does_not_block_a_restore(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(8, 8), "unused": torch.nn.Linear(8, 8)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sn = sentinel.attach(
        model,
        optimizer,
        publish={"enabled": False},
        control={"enabled": False},
        stats={"enabled": False},
        checkpoint={"dir": str(tmp_path / "ckpt"), "every": 2, "good_after": 1},
    )
    for x in _data(5):
        model["used"](x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sn.observe(loss=0.0)
    good = sn.checkpoints.latest_good()
    saved = _saved_params(good)
    assert good.name == "step-4" and sn.checkpoints.restore(good) == 4
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[f"app.model.{name}"])
    assert len(optimizer.state) == 2  # the used layer's weight and bias
    sn.close()
