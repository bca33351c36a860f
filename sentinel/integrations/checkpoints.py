"""Verdicts on the checkpoints a training framework saves itself, and rollback as stop-then-resume.

Why: the Hugging Face Trainer and Lightning save and resume their own checkpoints (model,
optimizer, scheduler, RNG, loop counters, data position).  Restoring weights in place under
their running loop would leave the loop's step counter, scheduler and data position on the
abandoned trajectory, so a rollback here stops the loop and resumes it from the framework
checkpoint sentinel chose.  The rules that make a checkpoint trustworthy are those of
``sentinel.checkpoint`` (docs/recovery.md): a checkpoint becomes *good* only after
``checkpoint.good_after`` steps in which every loss and measured gradient norm was finite,
parameters and optimizer state are still finite at the end, and no corrective command
(skip_update, skip_batches, rollback, lr_scale) was applied; otherwise it is *bad*.

:class:`FrameworkCheckpoints` stands in for ``CheckpointManager`` on the Sentinel handle
(``sn.checkpoints``): the command channel calls ``note``, ``step_end``, ``taint``, ``wait``,
``latest_good`` and ``restore`` on it as on the manager.  ``restore`` only records the
target; the framework adapter stops the loop and resumes from it.  Verdicts are kept in
memory (agreed across ranks) and written next to each checkpoint for people to read:
``<folder>/sentinel.json`` or ``<file>.sentinel.json``.  A rollback deletes the newer checkpoints
this integration wrote and renames the framework's (``abandoned-checkpoint-N-<time>``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sentinel import collectives
from sentinel.checkpoint import CheckpointError, NonFinite

log = logging.getLogger("sentinel")
MARKER = "sentinel.json"


@dataclass
class Verdict:
    step: int
    path: Path
    state: str  # pending | good | bad
    lr_factor: float = 1.0
    reason: str = ""


def marker_path(path: Path) -> Path:
    return path / MARKER if path.is_dir() else path.with_name(path.name + ".sentinel.json")


class FrameworkCheckpoints:
    """Judges the framework's checkpoints and picks the rollback target; one per callback, across re-attaches.

    ``verify(path)`` says why a checkpoint cannot be resumed from (None if it can); ``owns_files``
    lets retention delete checkpoints this integration wrote itself (Lightning), never the Trainer's.
    """

    def __init__(
        self,
        good_after: int,
        keep: int | None = None,
        verify: Callable[[Path], str | None] | None = None,
        owns_files: bool = False,
    ):
        self.good_after, self.keep, self.owns_files = good_after, keep, owns_files
        self.verify = verify or (lambda p: None if p.exists() else f"{p} does not exist")
        self.sn: Any = None
        self.verdicts: dict[int, Verdict] = {}
        self.requested: Verdict | None = None  # rollback target chosen by a command; the adapter resumes from it
        self.restored = 0
        self._nonfinite = NonFinite()
        self._no_save_at = -1

    def bind(self, sn: Any) -> None:
        """Follow a new Sentinel handle (a framework re-creates its optimizer at every fit/train call)."""
        self.sn = sn
        self._nonfinite = NonFinite()

    # ---- the CheckpointManager interface used by sentinel.control ----

    def note(self, loss: Any, grad_norm: Any) -> None:
        self._nonfinite.note(loss, grad_norm)

    def step_end(self, step: int) -> None:
        if self.requested is None and any(
            v.state == "pending" and step >= v.step + self.good_after for v in self.verdicts.values()
        ):
            self._judge(step)

    def taint(self, reason: str) -> None:
        self._no_save_at = self.sn.step if self.sn is not None else -1
        for v in self._pending():
            self._mark(v, "bad", reason)

    def wait(self) -> None:
        """Saves are the framework's and finish before its hook returns: nothing in flight."""

    def latest_good(
        self, max_step: int | None = None, *, any_lineage: bool = False, oldest: bool = False
    ) -> Path | None:
        """The newest (``oldest``: the oldest) good checkpoint at step <= ``max_step`` that verifies."""
        for v in sorted(self.verdicts.values(), key=lambda v: v.step if oldest else -v.step):
            if v.state != "good" or (max_step is not None and v.step > max_step):
                continue
            reason = self.verify(v.path) if collectives.rank() == 0 else None
            if collectives.all_min([int(reason is None)])[0]:
                return v.path
            log.warning("sentinel: checkpoint %s skipped: %s", v.path, reason or "it failed verification on rank 0")
        return None

    def restore(self, path: str | os.PathLike) -> int:
        """Choose ``path`` as the rollback target; the adapter stops the loop and resumes from it."""
        path = Path(path)
        target = next((v for v in self.verdicts.values() if v.path == path and v.state == "good"), None)
        if target is None:
            raise CheckpointError(f"{path} is not a good checkpoint of this run")
        self.requested = target
        self.restored += 1
        self._no_save_at = -1  # the step of this command belongs to the abandoned trajectory
        for v in [v for v in self.verdicts.values() if v.step > target.step]:
            self._abandon(v)
        log.warning("sentinel: rolling back to %s: the loop stops and resumes from it", path)
        return target.step

    def close(self) -> None:
        pass

    # ---- fed by the adapter ----

    def saved(self, step: int, path: Path) -> None:
        """The framework saved ``path`` at ``step`` (after the update of that step): it is pending from now."""
        if self.requested is not None:
            return
        if step == self._no_save_at:
            log.warning("sentinel: checkpoint %s saved at a step with a corrective command: marked bad", path)
        dirty = self._nonfinite.read()
        nonfinite = not self._finite_state()
        dirty, nonfinite = (bool(v) for v in collectives.all_max([int(dirty), int(nonfinite)]))
        if dirty:
            for v in self._pending():
                self._mark(v, "bad", f"a non-finite loss or gradient norm before step {step}")
        lr_factor = float(getattr(getattr(self.sn, "control", None), "lr_factor", 1.0))
        verdict = Verdict(step=step, path=path, state="pending", lr_factor=lr_factor)
        self.verdicts[step] = verdict
        if nonfinite or step == self._no_save_at:
            self._mark(
                verdict, "bad", "non-finite parameters or optimizer state" if nonfinite else "corrective command"
            )
        else:
            self._write(verdict)

    def take_request(self) -> Verdict | None:
        request, self.requested = self.requested, None
        return request

    # ---- judging ----

    def _pending(self) -> list[Verdict]:
        return [v for v in self.verdicts.values() if v.state == "pending"]

    def _judge(self, step: int) -> None:
        dirty = self._nonfinite.read()
        nonfinite = not self._finite_state()
        dirty, nonfinite = (bool(v) for v in collectives.all_max([int(dirty), int(nonfinite)]))
        if dirty or nonfinite:
            what = "a non-finite loss or gradient norm" if dirty else "non-finite parameters or optimizer state"
            for v in self._pending():
                self._mark(v, "bad", f"{what} before step {step}")
            return
        for v in self._pending():
            if step >= v.step + self.good_after:
                self._mark(v, "good", f"{self.good_after} clean steps up to step {step}")
        if self.owns_files and self.keep is not None and collectives.rank() == 0:
            self._retain()

    def _finite_state(self) -> bool:
        sn = self.sn
        if sn is None:
            return True
        tensors = [collectives.local(p.detach()) for p in sn.model.parameters()]
        for state in sn.optimizer.state.values():
            tensors += [
                collectives.local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
            ]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        return all(bool(torch.stack(flags).all()) for flags in by_device.values())  # one sync per device

    def _mark(self, v: Verdict, state: str, reason: str) -> None:
        v.state, v.reason = state, reason
        if state == "good":
            log.info("sentinel: checkpoint %s is good (%s)", v.path, reason)
        else:
            log.warning("sentinel: checkpoint %s will never be rolled back to: %s", v.path, reason)
        self._write(v)

    def _write(self, v: Verdict) -> None:
        if collectives.rank() != 0 or not v.path.exists():
            return
        doc = {"step": v.step, "verdict": v.state, "reason": v.reason, "lr_factor": v.lr_factor}
        try:
            target = marker_path(v.path)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(target)
        except OSError as exc:
            log.warning("sentinel: could not write the verdict of %s: %s", v.path, exc)

    def _abandon(self, v: Verdict) -> None:
        """Drop a checkpoint of the trajectory a rollback abandons: this integration's files are deleted,
        the framework's folders renamed out of its ``checkpoint-N`` pattern, so that neither its
        ``resume_from_checkpoint=True`` (the highest step) nor ``save_total_limit`` (which rotates
        out the oldest, i.e. the good ones first) takes them for part of the run."""
        del self.verdicts[v.step]
        if collectives.rank() != 0:
            return
        if self.owns_files:
            _remove(v.path)
            _remove(marker_path(v.path))
            return
        _remove(marker_path(v.path))
        if v.path.exists():
            _set_aside(v, f"abandoned by the rollback to step {self.requested.step if self.requested else '?'}")

    def _retain(self) -> None:
        good = sorted(s for s, v in self.verdicts.items() if v.state == "good")
        if not good:
            return
        keep = set(good[-self.keep :])
        for s, v in list(self.verdicts.items()):
            if s in keep or v.state == "pending" or s > good[-1]:
                continue
            del self.verdicts[s]
            _remove(v.path)
            _remove(marker_path(v.path))
            log.info("sentinel: deleted checkpoint %s (%s)", v.path, "retention" if v.state == "good" else "bad")


def abandoned_name(path: Path) -> Path:
    """``checkpoint-N`` -> ``abandoned-checkpoint-N-<UTC time>``: out of the Trainer's ``checkpoint-\\d+`` pattern."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"abandoned-{path.name}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"abandoned-{path.name}-{stamp}-{n}")
    return target


def _set_aside(v: Verdict, reason: str) -> None:
    target = abandoned_name(v.path)
    try:
        v.path.rename(target)
    except OSError as exc:
        log.error(
            "sentinel: could not rename the abandoned checkpoint %s (%s): resume_from_checkpoint=True would "
            "resume from it; delete it or resume from a path",
            v.path,
            exc,
        )
        return
    log.warning("sentinel: renamed the abandoned checkpoint %s to %s (%s)", v.path, target.name, reason)
    doc = {"step": v.step, "verdict": "abandoned", "reason": reason, "lr_factor": v.lr_factor}
    try:
        marker_path(target).write_text(json.dumps(doc))
    except OSError as exc:
        log.warning("sentinel: could not write the verdict of %s: %s", target, exc)


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("sentinel: could not delete %s: %s", path, exc)
