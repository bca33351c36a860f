"""What the framework callbacks share: attach per fit/train call, the step boundary, rollback as stop-then-resume.

A framework that owns the loop (Hugging Face ``Trainer``, Lightning) creates its optimizer
and scheduler at every ``train()``/``fit()`` call, so sentinel is attached at the start of
each call and closed at its end.  What must outlive one call lives here: the run name, the
command history (ids already handled, the agent's LR factor) and the checkpoint verdicts.
The transforms' state (guard EMA, ε buckets, WeSaR gates) goes into each framework checkpoint
(:meth:`Adapter.state`) and comes back from the one a resume starts from, as ``sn.state_dict()``
does with sentinel's own checkpoints.  The frameworks restore a checkpoint before the hook
where sentinel attaches, so only the first attach of a fresh run re-initialises weights
(``stabilise.init``, ``optim.wesar.init``; :func:`keep_weights`).

The step boundary maps the agent's commands onto what such a loop can do (docs/integrations.md):
``warn`` and ``skip_update`` and ``lr_scale`` work as in a plain loop; ``stop`` asks the loop to
stop; ``skip_batches`` skips the updates of that many batches (the framework's data position
cannot be moved from a callback); ``rollback`` chooses the newest good framework checkpoint,
stops the loop and leaves ``resume_from`` for :func:`sentinel.integrations.hf.train` /
:func:`sentinel.integrations.lightning.fit` to resume from, then skips the updates of ``skip``
batches.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from sentinel.attach import Sentinel
from sentinel.config import Config, load_config
from sentinel.control import scale_lr
from sentinel.integrations.checkpoints import FrameworkCheckpoints, Verdict

log = logging.getLogger("sentinel")
STATE_VERSION = 1


def load(config: Any, overrides: dict[str, Any]) -> Config:
    return load_config(config, **{k.replace("__", "."): v for k, v in overrides.items()})


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (hooks go on it)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def keep_weights(cfg: Config, why: str) -> None:
    """Turn off the re-initialisations of ``cfg`` (``stabilise.init``, ``optim.wesar.init``) for this attach.

    The framework loads a checkpoint before its train-begin hook, where sentinel attaches, so a
    re-initialisation there would overwrite the weights just restored (or trained by an earlier
    call).  They belong to the first attach of a fresh run; the embedding hooks stay on.
    """
    dropped = []
    if cfg.stabilise.init != "keep":
        dropped.append(f"stabilise.init={cfg.stabilise.init!r}")
        cfg.stabilise.init = "keep"
    if cfg.optim.wesar.init != "keep":
        if cfg.optim.wesar.enabled:
            dropped.append(f"optim.wesar.init={cfg.optim.wesar.init!r}")
        cfg.optim.wesar.init = "keep"
    if dropped:
        log.warning(
            "sentinel: %s not applied at %s: the weights are kept as the framework restored or trained them",
            " and ".join(dropped),
            why,
        )


class Adapter:
    """Sentinel across the fit/train calls of one framework trainer."""

    def __init__(self, config: Config, checkpoints: FrameworkCheckpoints):
        self.config = config
        self.checkpoints = checkpoints
        self.sentinel: Sentinel | None = None
        self.live = False
        self.resume_from: str | None = None
        self.rollbacks: list[dict[str, Any]] = []
        self._run = config.run
        self._control_state: dict[str, Any] | None = None
        self._live_state: dict[str, Any] | None = None
        self._resume: Verdict | None = None
        self._skip_after_resume = 0
        self._skipped_seen = 0
        self._attached = False

    def attach(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        lr_scheduler: Any,
        step: int,
        state: dict | None = None,
        resumed: bool = False,
        grad_scaler: Any = None,
    ) -> Sentinel:
        """Attach to this call's model, optimizer and scheduler; ``step`` is the loop's step after any resume.

        ``grad_scaler``: the framework's ``GradScaler`` under fp16 mixed precision (see :func:`sentinel.attach`).

        ``state`` is :meth:`state` as saved with the checkpoint the loop ``resumed`` from (None: the
        transforms start afresh).  Without a resume they continue from the previous call's live state.
        Only the first attach of a fresh run re-initialises weights (:func:`keep_weights`).
        """
        self.close()
        cfg = copy.deepcopy(self.config)
        cfg.checkpoint.dir = None  # the framework's checkpoints are the rollback targets
        cfg.run = self._run
        resumed = resumed or self._resume is not None
        if resumed or step > 0 or self._attached:
            keep_weights(cfg, "a resume" if resumed or step > 0 else "a later train()/fit() call")
        self._attached = True
        sn = Sentinel(model, unwrap_optimizer(optimizer), cfg, lr_scheduler=lr_scheduler, grad_scaler=grad_scaler)
        self._run = sn.run
        sn.step = step
        if sn.control is not None:
            if self._control_state is not None:
                sn.control.load_state_dict(self._control_state)
            sn.checkpoints = self.checkpoints
            self.checkpoints.bind(sn)
        self._load_state(sn, state if resumed else self._live_state)
        resume, self._resume = self._resume, None
        if resume is not None:
            self.resume_from = None  # consumed: the loop has resumed from it
            self._after_rollback(sn, resume, step)
        self._skipped_seen = sn.position.skipped
        self.sentinel, self.live = sn, True
        return sn

    def state(self) -> dict[str, Any] | None:
        """Sentinel's state that belongs in the framework's checkpoint: the transforms' (guard EMA, ε, gates)."""
        sn = self.sentinel
        if sn is None or not self.live or sn.chain is None:
            return None
        return {"version": STATE_VERSION, "optim": sn.chain.state_dict()}

    @staticmethod
    def _load_state(sn: Sentinel, state: dict[str, Any] | None) -> None:
        if state is None or sn.chain is None:
            return
        if state.get("version") != STATE_VERSION:
            log.error(
                "sentinel: saved state version %r, this sentinel reads %d: not loaded",
                state.get("version"),
                STATE_VERSION,
            )
            return
        try:
            sn.chain.load_state_dict(state["optim"])
        except Exception:
            sn.errors += 1
            log.exception("sentinel: the transforms' saved state could not be loaded; they start afresh")

    @property
    def pending_resume(self) -> Verdict | None:
        """The rollback target the next attach resumes from."""
        return self._resume

    def _after_rollback(self, sn: Sentinel, target: Verdict, step: int) -> None:
        if step != target.step:
            log.error(
                "sentinel: resumed at step %d, but the rollback chose %s (step %d): was another checkpoint given?",
                step,
                target.path,
                target.step,
            )
            return
        live = sn.control.lr_factor if sn.control is not None else 1.0
        if target.lr_factor > 0 and live != target.lr_factor:
            scale_lr(sn.optimizer, sn.lr_scheduler, live / target.lr_factor)
        skip, self._skip_after_resume = self._skip_after_resume, 0
        if skip:
            sn.skip_updates(skip, reason=f"rollback to {target.path.name}: skipping the updates of {skip} batch(es)")
        log.warning("sentinel: resumed from %s at step %d", target.path, step)

    def boundary(self, step: int, loss: Any) -> str | None:
        """The step boundary after update ``step`` (1-based, as the loops count); returns 'stop', 'rollback' or None."""
        sn = self.sentinel
        if sn is None or not self.live:
            return None
        try:
            return self._boundary(sn, step, loss)
        except Exception:
            sn.errors += 1
            log.exception("sentinel: the step boundary failed at step %d (training continues)", step)
            return None

    def _boundary(self, sn: Sentinel, step: int, loss: Any) -> str | None:
        sn.step = step - 1
        sn.observe(loss=loss)
        skipped = sn.position.skipped - self._skipped_seen
        self._skipped_seen = sn.position.skipped
        request = self.checkpoints.take_request()
        if request is not None:
            self._resume, self._skip_after_resume = request, skipped
            self.resume_from = str(request.path)
            self.rollbacks.append(
                {"from_step": step, "to_step": request.step, "path": str(request.path), "skip": skipped}
            )
            log.warning("sentinel: stopping at step %d to resume from %s", step, request.path)
            return "rollback"
        if skipped:
            sn.skip_updates(
                skipped, reason="skip_batches: the loop's data position cannot move, so updates are skipped"
            )
        return "stop" if sn.should_stop else None

    def saved(self, step: int, path: Path) -> None:
        sn = self.sentinel
        if not self.live or self._resume is not None or sn is None or sn.control is None:
            return
        try:
            self.checkpoints.saved(step, path)
        except Exception:
            sn.errors += 1
            log.exception("sentinel: judging checkpoint %s failed (it will not become good)", path)

    def close(self) -> None:
        """Flush and detach at the end of a fit/train call; ``sentinel`` stays readable."""
        sn = self.sentinel
        if sn is None or not self.live:
            return
        self._live_state = self.state()
        self.live = False
        if sn.control is not None:
            self._control_state = sn.control.state_dict()
        sn.checkpoints = None
        sn.close()


class AdapterViews:
    """What both callbacks expose of their :class:`Adapter`."""

    adapter: Adapter

    @property
    def sentinel(self) -> Any:
        return self.adapter.sentinel

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        return self.adapter.rollbacks

    @property
    def resume_from(self) -> str | None:
        """The checkpoint a rollback chose, until the framework's train()/fit() helper resumes from it."""
        return self.adapter.resume_from
