"""Checkpoints a rollback can trust, on ``torch.distributed.checkpoint`` (DCP).

Why each rule exists (docs/recovery.md has the user's view):

- Folders are ``step-N``.  DCP's coordinator writes ``.metadata`` last, so a folder without it
  is an unfinished save.  After its save completes, every rank writes ``.manifest-RANK.json``
  with the size and sha256 of the files it wrote (rank 0 adds ``.metadata``); a restore first
  checks every file against them, the work split across ranks, and all ranks agree on the
  verdict.  A partial or corrupt checkpoint is passed over with its reason logged, never loaded.
- A checkpoint is *saved* only when parameters and optimizer state are finite on every rank,
  and becomes *good* (``.good``) only after ``good_after`` further clean steps: every loss and
  measured gradient norm finite, parameters and optimizer state still finite, and no corrective
  command (skip_update, skip_batches, rollback, lr_scale) applied meanwhile.  Otherwise it is
  marked ``.bad``.  Rollbacks only ever restore good checkpoints.
- Retention keeps the newest ``keep`` good checkpoints and deletes older ones, and bad or
  unfinished ones older than the newest good one; nothing newer than the newest good one is
  deleted, so a good checkpoint never makes room for an unproven one.
- A restore moves the checkpoints newer than it (the abandoned trajectory) to ``superseded/``;
  they are deleted once the resumed trajectory has a good checkpoint of its own.  Each
  trajectory has a lineage id, so a new run in an old folder never rolls back onto the old run.
- What is saved: the model and optimizer through ``get_state_dict`` (DDP/FSDP aware), the LR
  scheduler, and per rank sentinel's own state (data position included) and every RNG.  The
  scheduler and per-rank parts are ``torch.save`` blobs read back with ``weights_only=True``.

Every method that touches checkpoints is collective under ``torch.distributed``: call it on
every rank at the same point, as ``observe()`` does.  Nothing here raises into the training
loop from ``observe()``: failures are logged and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from sentinel import collectives, rng

if TYPE_CHECKING:
    from sentinel.attach import Sentinel
    from sentinel.config import CheckpointConfig

log = logging.getLogger("sentinel")

FOLDER = re.compile(r"^step-(\d+)$")
GOOD, BAD, SUPERSEDED = ".good", ".bad", "superseded"
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    lineage: str | None
    good: bool
    bad: bool
    complete: bool


def manifest_name(rank: int) -> str:
    return f".manifest-{rank}.json"


class NonFinite:
    """Remembers, on the device (no host sync per step), whether a loss or gradient norm was not finite."""

    def __init__(self) -> None:
        self._flag: torch.Tensor | None = None
        self._host = False

    def note(self, *values: Any) -> None:
        for value in values:
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                flag = ~torch.isfinite(value.detach()).all()
                self._flag = flag if self._flag is None else self._flag | flag.to(self._flag.device)
            elif not math.isfinite(float(value)):
                self._host = True

    def read(self) -> bool:
        """Whether anything non-finite was noted since the last read (one host sync), then forget it."""
        bad, self._host = self._host, False
        if self._flag is not None:
            bad = bad or bool(self._flag.item())
            self._flag = None
        return bad


class CheckpointManager:
    """Saves every ``checkpoint.every`` steps, judges each after ``good_after`` steps, restores good ones."""

    def __init__(self, sn: Sentinel, config: CheckpointConfig):
        if config.dir is None:
            raise ValueError("checkpoint.dir is null: checkpointing is off")
        self.sn, self.config = sn, config
        self.dir = Path(config.dir)
        self.rank, self.world = collectives.rank(), collectives.world_size()
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.lineage = collectives.broadcast_bytes(uuid.uuid4().hex.encode()).decode()
        self.saved = self.refused = self.failed = self.restored = 0
        self._pending: dict[int, bool] = {}  # step saved -> this rank's save finished well; not yet judged
        self._nonfinite = NonFinite()
        self._no_save_at = -1
        self._superseded: list[Path] = []
        self._verified: Path | None = None  # moved aside by this process; deleted after the next good one
        self._inflight: tuple[Future, int] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sentinel-ckpt") if config.async_save else None
        self._async_group = collectives.new_cpu_group() if config.async_save and collectives.active() else None
        if self.rank == 0:
            existing = [c for c in self.entries() if c.complete]
            if existing:
                log.info(
                    "sentinel: %s holds %d checkpoint(s) of earlier runs (newest %s); sn.checkpoints.resume() "
                    "continues from the newest good one; this run's saves never roll back onto them",
                    self.dir,
                    len(existing),
                    existing[-1].path.name,
                )

    @classmethod
    def create(cls, sn: Sentinel, config: CheckpointConfig) -> CheckpointManager | None:
        return cls(sn, config) if config.dir is not None else None

    # ---- per-step bookkeeping (from observe) ----

    def note(self, loss: Any, grad_norm: Any) -> None:
        """Remember a non-finite loss or gradient norm, on the device (no host sync)."""
        self._nonfinite.note(loss, grad_norm)

    def step_end(self, step: int) -> None:
        """Judge checkpoints whose clean window is over, then save if one is due."""
        self._verified = None
        if any(step >= s + self.config.good_after for s in self._pending):
            self._judge(step)
        if step % self.config.every == 0 and step != self._no_save_at:
            self.save(step)

    def taint(self, reason: str) -> None:
        """A corrective command was applied: no checkpoint pending now may become good, and none is saved this step."""
        self._no_save_at = self.sn.step
        for step in list(self._pending):
            self._mark(step, good=False, reason=reason)
        self._pending.clear()

    # ---- save ----

    def save(self, step: int | None = None) -> Path | None:
        """Save a checkpoint of the current state as ``step-STEP`` (collective); None if refused or failed."""
        step = self.sn.step if step is None else step
        self.wait()
        dirty = self._nonfinite.read()
        nonfinite = not self._finite_state()
        unstarted = not self.sn.optimizer.state
        dirty, nonfinite, unstarted = (bool(v) for v in collectives.all_max([dirty, nonfinite, unstarted]))
        if dirty:
            self._taint_window(f"a non-finite loss or gradient norm before step {step}")
        if nonfinite:
            self.refused += 1
            log.error("sentinel: checkpoint step-%d NOT saved: non-finite parameters or optimizer state", step)
            return None
        if unstarted:
            log.info("sentinel: checkpoint step-%d deferred: the optimizer has no state yet (no update applied)", step)
            return None
        path = self.dir / f"step-{step}"
        if self.rank == 0:
            self._clear_slot(path)
        collectives.barrier()
        app = {"app": _AppState(self, for_load=False)}
        try:
            with _quiet_dcp():
                if self._executor is not None:
                    response = dcp.async_save(app, checkpoint_id=str(path), process_group=self._async_group)
                    upload = getattr(response, "upload_completion", response)
                    self._pending[step] = True
                    self._inflight = (self._executor.submit(self._finish, upload, path, step), step)
                else:
                    dcp.save(app, checkpoint_id=str(path))
                    self._pending[step] = self._finish(None, path, step)
        except (Exception, dcp.CheckpointException) as exc:  # DCP's exception is a BaseException
            self._pending[step] = False
            self._failed_save(step, exc)
            if self.rank == 0:
                self._discard(path)
            return None
        self.saved += 1
        log.info("sentinel: checkpoint step-%d %s", step, "saving in the background" if self._executor else "saved")
        return path

    def _finish(self, upload: Future | None, path: Path, step: int) -> bool:
        """After this rank's part of the save is on disk: write its manifest (sizes and sha256)."""
        try:
            if upload is not None:
                upload.result()
            names = sorted(p.name for p in path.glob(f"__{self.rank}_*.distcp"))
            if self.rank == 0:
                names.append(".metadata")
            files = {n: _describe_file(path / n, self.config.checksum) for n in names}
            _write_json(
                path / manifest_name(self.rank),
                {
                    "format": MANIFEST_FORMAT,
                    "step": step,
                    "rank": self.rank,
                    "world_size": self.world,
                    "lineage": self.lineage,
                    "files": files,
                    "time": time.time(),
                },
            )
            return True
        except (Exception, dcp.CheckpointException) as exc:
            self._failed_save(step, exc)
            return False

    def _failed_save(self, step: int, exc: BaseException) -> None:
        """Loud, counted, and per ``checkpoint.on_failure`` the end of the run; never raised into the loop."""
        self.failed += 1
        stop = self.config.on_failure == "stop"
        log.error(
            "sentinel: checkpoint step-%d FAILED on rank %d: %s; it will never be restored, the older good "
            "checkpoints are kept; %s",
            step,
            self.rank,
            _reason(exc),
            "the run stops (checkpoint.on_failure: stop)" if stop else "training continues (checkpoint.on_failure)",
            exc_info=exc,
        )
        if stop:
            self.sn.position.stop()

    def _discard(self, path: Path) -> None:
        """Remove what a failed save left (frees the space a full disk needs); never a good checkpoint."""
        if path.is_dir() and not (path / GOOD).is_file():
            shutil.rmtree(path, ignore_errors=True)
            log.warning("sentinel: removed the partial checkpoint %s", path.name)

    def wait(self) -> None:
        """Wait for the save in flight, if any (one at a time)."""
        if self._inflight is None:
            return
        (future, step), self._inflight = self._inflight, None
        ok = future.result()
        if step in self._pending:
            self._pending[step] = ok

    # ---- judging ----

    def _judge(self, step: int) -> None:
        self.wait()
        due = sorted(s for s in self._pending if step >= s + self.config.good_after)
        local = [self._nonfinite.read(), not self._finite_state()] + [not self._pending[s] for s in due]
        flags = [bool(v) for v in collectives.all_max([int(v) for v in local])]
        dirty, nonfinite, failed = flags[0], flags[1], flags[2:]
        if dirty or nonfinite:
            what = "a non-finite loss or gradient norm" if dirty else "non-finite parameters or optimizer state"
            self._taint_window(f"{what} before step {step}")
            return
        promoted = False
        for s, bad_save in zip(due, failed):
            del self._pending[s]
            if bad_save:
                self._mark(s, good=False, reason="the save failed on at least one rank")
            else:
                self._mark(s, good=True, reason=f"{self.config.good_after} clean steps up to step {step}")
                promoted = True
        if promoted and self.rank == 0:
            self._retain()

    def _taint_window(self, reason: str) -> None:
        for s in list(self._pending):
            self._mark(s, good=False, reason=reason)
        self._pending.clear()

    def _mark(self, step: int, good: bool, reason: str) -> None:
        if good:
            log.info("sentinel: checkpoint step-%d is good (%s)", step, reason)
        else:
            log.warning("sentinel: checkpoint step-%d will never be restored: %s", step, reason)
        if self.rank == 0:
            path = self.dir / f"step-{step}"
            if path.is_dir():
                doc = {"step": step, "at_step": self.sn.step, "lineage": self.lineage, "reason": reason}
                try:
                    _write_json(path / (GOOD if good else BAD), doc)
                except OSError as exc:
                    log.error("sentinel: cannot mark checkpoint step-%d %s: %s", step, "good" if good else "bad", exc)

    def _finite_state(self) -> bool:
        tensors = [_local(p.detach()) for p in self.sn.model.parameters()]
        for state in self.sn.optimizer.state.values():
            tensors += [_local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        return all(bool(torch.stack(flags).all()) for flags in by_device.values())

    # ---- finding and restoring ----

    def entries(self) -> list[CheckpointInfo]:
        """Every ``step-N`` folder, oldest first (this rank's view of the shared folder)."""
        out = []
        for child in self.dir.iterdir() if self.dir.is_dir() else ():
            m = FOLDER.match(child.name)
            if not m or not child.is_dir():
                continue
            meta = _read_json(child / manifest_name(0))
            out.append(
                CheckpointInfo(
                    step=int(m.group(1)),
                    path=child,
                    lineage=meta.get("lineage") if meta else None,
                    good=(child / GOOD).is_file(),
                    bad=(child / BAD).is_file(),
                    complete=(child / ".metadata").is_file() and meta is not None,
                )
            )
        return sorted(out, key=lambda c: c.step)

    def latest_good(
        self, max_step: int | None = None, *, any_lineage: bool = False, oldest: bool = False
    ) -> Path | None:
        """The newest (``oldest``: the oldest) good checkpoint at step <= ``max_step`` that passes
        verification (collective).

        Checkpoints that fail verification are skipped with their reason logged.  Only this
        trajectory's checkpoints count, unless ``any_lineage`` (used by :meth:`resume`).
        """
        self.wait()
        steps: list[int] = []
        if self.rank == 0:
            entries = self.entries()
            steps = [
                c.step
                for c in (entries if oldest else reversed(entries))
                if c.good
                and (max_step is None or c.step <= max_step)
                and (any_lineage or c.lineage in (self.lineage, None))
            ]
        steps = json.loads(collectives.broadcast_bytes(json.dumps(steps).encode()) or b"[]")
        for step in steps:
            path = self.dir / f"step-{step}"
            reason = self._verify(path, expect_lineage=None if any_lineage else self.lineage)
            if collectives.all_min([int(reason is None)])[0]:
                self._verified = path
                return path
            log.warning(
                "sentinel: checkpoint %s skipped: %s", path.name, reason or "it failed verification on another rank"
            )
        return None

    def _verify(self, path: Path, expect_lineage: str | None = None) -> str | None:
        """None if this rank's share of ``path`` checks out, else the reason it does not."""
        if not (path / ".metadata").is_file():
            return "no .metadata: the save never finished"
        first = _read_json(path / manifest_name(0))
        if first is None:
            return f"{manifest_name(0)} missing or unreadable: the save never finished"
        if expect_lineage is not None and first.get("lineage") != expect_lineage:
            return f"it belongs to another trajectory (lineage {first.get('lineage')})"
        manifests = [first]
        for r in range(1, int(first.get("world_size", 1))):
            m = _read_json(path / manifest_name(r))
            if m is None:
                return f"{manifest_name(r)} missing or unreadable: rank {r}'s save never finished"
            manifests.append(m)
        entries = sorted((name, meta) for m in manifests for name, meta in m.get("files", {}).items())
        if ".metadata" not in {name for name, _ in entries}:
            return "the manifests do not cover .metadata"
        for i, (name, meta) in enumerate(entries):
            if i % self.world != self.rank:
                continue
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            size = f.stat().st_size
            if size != meta.get("size"):
                return f"{name} has {size} bytes, its manifest says {meta.get('size')}"
            if meta.get("sha256") and _sha256(f) != meta["sha256"]:
                return f"{name} does not match its sha256 (corrupt)"
        return None

    def restore(self, path: str | os.PathLike) -> int:
        """Load model, optimizer, scheduler, sentinel state, RNG and data position from ``path`` (collective).

        Raises CheckpointError (before touching anything) if the checkpoint does not verify.
        Commands already handled and the LR factor the agent set survive the restore.
        Returns the restored step.
        """
        path = Path(path)
        self.wait()
        verified, self._verified = self._verified == path, None  # just verified by latest_good: not twice
        reason = None if verified else self._verify(path)
        if not verified and not collectives.all_min([int(reason is None)])[0]:
            raise CheckpointError(
                f"{path.name} cannot be restored: {reason or 'it failed verification on another rank'}"
            )
        control = getattr(self.sn, "control", None)
        live = control.state_dict() if control is not None else None
        app = _AppState(self, for_load=True)
        try:
            with _quiet_dcp():
                dcp.load({"app": app}, checkpoint_id=str(path))
        except (Exception, dcp.CheckpointException) as exc:
            log.critical(
                "sentinel: loading %s failed after it verified; the model may be partly overwritten, so the run "
                "stops (sn.should_stop)",
                path.name,
                exc_info=True,
            )
            self.sn.position.stop()
            raise CheckpointError(f"{path.name} failed to load: {exc}") from exc
        from_step = self.sn.step
        self.sn.weights_changed(f"restore of {path.name}")
        self.sn.load_state_dict(app.loaded["sentinel"])
        rng.restore(app.loaded["rng"])
        if control is not None and live is not None:
            control.after_restore(live)
        self.lineage = (_read_json(path / manifest_name(0)) or {}).get("lineage", self.lineage)
        self._pending.clear()
        self._nonfinite = NonFinite()
        self._no_save_at = self.sn.step
        self.restored += 1
        if self.rank == 0:
            self._supersede_after(self.sn.step)
        collectives.barrier()
        log.warning("sentinel: restored checkpoint %s at step %d (now at step %d)", path.name, from_step, self.sn.step)
        return self.sn.step

    def resume(self) -> int | None:
        """Restore the newest good checkpoint in ``checkpoint.dir`` from any earlier run; None if there is none."""
        path = self.latest_good(any_lineage=True)
        return None if path is None else self.restore(path)

    # ---- the folder (rank 0) ----

    def _clear_slot(self, path: Path) -> None:
        if not path.exists():
            return
        meta = _read_json(path / manifest_name(0))
        ours = meta is None or meta.get("lineage") == self.lineage
        if ours and not (path / GOOD).is_file():
            shutil.rmtree(path, ignore_errors=True)
        else:
            self._move_aside(path, ours)

    def _move_aside(self, path: Path, ours: bool) -> None:
        dest = self.dir / SUPERSEDED / f"{path.name}.{time.time_ns()}"
        dest.parent.mkdir(exist_ok=True)
        path.rename(dest)
        if ours:
            self._superseded.append(dest)
        log.warning("sentinel: moved %s to %s (%s)", path.name, dest, "abandoned trajectory" if ours else "another run")

    def _supersede_after(self, step: int) -> None:
        for c in self.entries():
            if c.step > step and c.lineage in (self.lineage, None):
                self._move_aside(c.path, ours=True)

    def _retain(self) -> None:
        ours = [c for c in self.entries() if c.lineage in (self.lineage, None)]
        good = [c.step for c in ours if c.good]
        if not good:
            return
        keep = set(good[-self.config.keep :])
        for c in ours:
            if c.step in self._pending or c.step in keep:
                continue
            if c.good or c.step < good[-1]:
                shutil.rmtree(c.path, ignore_errors=True)
                log.info("sentinel: deleted checkpoint %s (%s)", c.path.name, "retention" if c.good else "not good")
        for p in self._superseded:
            shutil.rmtree(p, ignore_errors=True)
        self._superseded.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class _AppState(Stateful):
    """What a checkpoint holds; DCP calls ``state_dict`` to save or to shape a load, then ``load_state_dict``."""

    def __init__(self, manager: CheckpointManager, for_load: bool):
        self.m, self.for_load = manager, for_load
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        sn = self.m.sn
        with _silent_step_hooks(sn.optimizer):
            model_sd, optim_sd = get_state_dict(sn.model, sn.optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        key = f"rank_{self.m.rank}"
        if self.for_load:
            state[key] = b""
            if sn.lr_scheduler is not None:
                state["scheduler"] = b""
        else:
            state[key] = _blob({"sentinel": sn.state_dict(), "rng": rng.capture()})
            if sn.lr_scheduler is not None:
                state["scheduler"] = _blob(sn.lr_scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sn = self.m.sn
        # strict=False: a parameter that never had a gradient (unused, frozen in practice) has no
        # optimizer state to load; DCP has already checked that everything in the template was found.
        set_state_dict(
            sn.model,
            sn.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=False),
        )
        if sn.lr_scheduler is not None:
            sn.lr_scheduler.load_state_dict(_unblob(state["scheduler"]))
        self.loaded = _unblob(state[f"rank_{self.m.rank}"])


@contextlib.contextmanager
def _silent_step_hooks(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """``get_state_dict`` initialises an empty optimizer with a zero-LR step; no hook may see that step."""
    pre = getattr(optimizer, "_optimizer_step_pre_hooks", None)
    post = getattr(optimizer, "_optimizer_step_post_hooks", None)
    if optimizer.state or pre is None or post is None:
        yield
        return
    optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = pre, post


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _blob(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    """The innermost OS error of a (DCP-wrapped) exception, e.g. "[Errno 28] No space left on device"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return str(seen)
        for inner in getattr(seen, "failures", {}).values():
            inner = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner, BaseException):
                return _reason(inner)
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


def _describe_file(path: Path, checksum: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"size": path.stat().st_size}
    if checksum:
        out["sha256"] = _sha256(path)
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
