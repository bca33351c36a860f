"""Checkpoint saves that go wrong for real: a full disk (a small tmpfs) and a trainer SIGKILLed mid-save.

The good checkpoints must survive both, a restart must use them, and the failure must be loud.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sentinel
from sentinel.checkpoint import GOOD, manifest_name


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))


def _attach(model: torch.nn.Module, ckpt_dir: Path, **checkpoint) -> sentinel.Sentinel:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"dir": str(ckpt_dir), "every": 4, "good_after": 2, "keep": 2, **checkpoint}
    return sentinel.attach(
        model,
        optimizer,
        run="faults",
        publish={"enabled": False},
        control={"enabled": False},
        stats={"enabled": False},
        checkpoint=cfg,
    )


def _train(sn: sentinel.Sentinel, model: torch.nn.Module, until: int) -> None:
    data = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(64)]
    for x in sn.batches(data):
        loss = (model(x) - x).square().mean()
        loss.backward()
        sn.optimizer.step()
        sn.optimizer.zero_grad()
        sn.observe(loss=loss)
        if sn.step >= until:
            break


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the file system."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("on_failure", ["continue", "stop"])
def test_disk_full_save_fails_loudly_and_keeps_the_good_checkpoints(small_disk, caplog, on_failure):
    model = _model()
    sn = _attach(model, small_disk / "ckpt", on_failure=on_failure)
    _train(sn, model, until=11)
    ckpt = sn.checkpoints
    assert ckpt is not None and [c.step for c in ckpt.entries() if c.good] == [4, 8]
    one = sum(f.stat().st_size for f in (small_disk / "ckpt" / "step-8").iterdir())
    filler = _fill(small_disk, leave=one // 3)

    with caplog.at_level(logging.ERROR, logger="sentinel"):
        _train(sn, model, until=13)  # the save at step 12 hits the full disk
    assert ckpt.failed == 1
    assert "checkpoint step-12 FAILED" in caplog.text and "No space left on device" in caplog.text
    assert not (small_disk / "ckpt" / "step-12").exists(), "the partial folder must go, to free the space"
    assert sn.should_stop is (on_failure == "stop")
    assert ckpt.latest_good() == small_disk / "ckpt" / "step-8"

    if on_failure == "stop":
        stopped_at = sn.step
        _train(sn, model, until=20)
        assert sn.step == stopped_at, "sn.batches() yields nothing once the run is told to stop"
        return
    filler.unlink()
    _train(sn, model, until=19)  # space again: step-16 saves and becomes good at 18
    assert ckpt.failed == 1 and [c.step for c in ckpt.entries() if c.good] == [8, 16]
    assert ckpt.restore(small_disk / "ckpt" / "step-8") == 8
    sn.close()


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from integration.test_checkpoint_faults import _attach, _model, _train
    import sentinel.checkpoint

    ckpt_dir, mode = Path(sys.argv[1]), sys.argv[2]

    def hang(what):
        print("HANGING " + what, flush=True)
        time.sleep(600)

    if mode == "data":  # killed after a data file of step-12 is written, before .metadata
        real_fsync = os.fsync
        def fsync(fd):
            real_fsync(fd)
            if "step-12" in os.readlink(f"/proc/self/fd/{{fd}}"):
                hang("data")
        os.fsync = fsync
    elif mode == "manifest":  # killed after DCP finished step-12, before sentinel's manifest
        real = sentinel.checkpoint._describe_file
        def describe(path, checksum):
            if path.parent.name == "step-12":
                hang("manifest")
            return real(path, checksum)
        sentinel.checkpoint._describe_file = describe

    model = _model()
    sn = _attach(model, ckpt_dir)
    if mode == "resume":
        print("RESUMED", sn.checkpoints.resume(), flush=True)
    _train(sn, model, until=int(sys.argv[3]))
    print("STEP", sn.step, "GOOD", [c.step for c in sn.checkpoints.entries() if c.good], flush=True)
    sn.close()
    """
)


def _child(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).resolve().parents[1])))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.mark.parametrize("mode", ["data", "manifest"])
def test_trainer_killed_mid_save_restarts_from_the_last_good_checkpoint(tmp_path: Path, mode: str) -> None:
    ckpt_dir = tmp_path / "ckpt"
    proc = _child(tmp_path, str(ckpt_dir), mode, "20")
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("HANGING"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(out)
    partial = ckpt_dir / "step-12"
    assert partial.is_dir() and not (partial / manifest_name(0)).exists()
    good = {p.name: (p / GOOD).is_file() for p in ckpt_dir.iterdir() if p.name.startswith("step-")}
    assert good == {"step-4": True, "step-8": True, "step-12": False}

    resumed = _child(tmp_path, str(ckpt_dir), "resume", "16")
    text, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, text
    assert "RESUMED 8" in text, text  # the newest good one; the half-written step-12 is never loaded
    assert "STEP 16 GOOD [8, 12]" in text, text  # step-12 saved afresh over the partial one, and good at 14
    assert (partial / manifest_name(0)).is_file()
