"""Sentinel for Lightning: a ``Callback`` and a ``fit()`` that follows rollbacks.

    from sentinel.integrations.lightning import SentinelCallback, fit
    trainer = L.Trainer(max_steps=10_000, callbacks=[SentinelCallback("sentinel.yaml")])
    fit(trainer, model, datamodule=dm)  # trainer.fit(), resumed from sentinel's chosen checkpoint after a rollback

Hooks (Lightning 2.x): the optimizers exist from ``on_train_start``, after a checkpoint has
been restored.  In automatic optimization Lightning calls ``optimizer.step(closure)`` and the
closure runs forward and backward *inside* the step, after any step pre-hook, so sentinel's
pre-update transforms (guard, statistics) run from ``on_before_optimizer_step``, which
Lightning calls once the gradients exist, before it clips them (:meth:`Sentinel.defer_pre_step`).
``on_train_batch_end`` after a batch that stepped the optimizer is the step boundary; its
``outputs["loss"]`` is the training_step loss divided by ``accumulate_grad_batches``, so the
published loss is the sum over the accumulated batches.

Checkpoints: with ``checkpoint.dir`` set, this callback saves a full Lightning checkpoint
(``trainer.save_checkpoint``: model, optimizers, schedulers, loops, callbacks) as
``step-N.ckpt`` every ``checkpoint.every`` optimizer steps, judges it, keeps ``checkpoint.keep``
good ones, and a rollback resumes ``trainer.fit(ckpt_path=...)`` from the newest good one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sentinel.config import Config
from sentinel.integrations import missing
from sentinel.integrations.adapter import Adapter, AdapterViews, load, unwrap_optimizer
from sentinel.integrations.checkpoints import FrameworkCheckpoints

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:
    raise ImportError(missing("lightning", "lightning")) from exc

__all__ = ["SentinelCallback", "fit"]
log = logging.getLogger("sentinel")


def lightning_checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from by ``trainer.fit(ckpt_path=...)``, or None."""
    if not path.is_file():
        return f"{path} does not exist"
    if path.stat().st_size == 0:
        return f"{path} is empty: the save never finished"
    return None


class SentinelCallback(AdapterViews, Callback):
    """Attach sentinel to the LightningModule and its optimizer and obey the agent's commands.

    ``config`` and keyword ``overrides`` are as for :func:`sentinel.attach`.  ``checkpoint.dir``
    turns on this callback's checkpoints (the rollback targets); null leaves rollback off
    (acked ``rejected``).  One optimizer is supported.  After training, ``sentinel`` is the
    (closed) handle of the last ``fit()`` call and ``rollbacks`` lists the rollbacks done.
    """

    def __init__(self, config: str | Path | dict | Config | None = None, **overrides: Any):
        cfg = load(config, overrides)
        ck = cfg.checkpoint
        self.dir = Path(ck.dir) if ck.dir is not None else None
        self.every = ck.every
        judge = FrameworkCheckpoints(ck.good_after, keep=ck.keep, verify=lightning_checkpoint_problem, owns_files=True)
        self.adapter = Adapter(cfg, judge)
        self._losses: list[torch.Tensor] = []
        self._stepped = False
        self._loaded_state: dict[str, Any] | None = None

    # ---- hooks ----

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            log.error(
                "sentinel: the Lightning callback supports one optimizer, got %d; sentinel is off",
                len(trainer.optimizers),
            )
            return
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        state, self._loaded_state = self._loaded_state, None
        resumed = trainer.ckpt_path is not None
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)  # 16-mixed: its loss scale
        sn = self.adapter.attach(
            pl_module, trainer.optimizers[0], scheduler, trainer.global_step, state, resumed, grad_scaler=scaler
        )
        sn.defer_pre_step()
        if sn.control is not None:
            sn.checkpoints = self.adapter.checkpoints if self.dir is not None else None
        self._losses, self._stepped = [], False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        sn = self.adapter.sentinel
        if sn is not None and self.adapter.live and unwrap_optimizer(optimizer) is sn.optimizer:
            sn.pre_step()
            self._stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
        if not self._stepped:
            return
        self._stepped = False
        parts, self._losses = self._losses, []
        value = torch.stack([p.float().reshape(()) for p in parts]).sum() if parts else None
        if self.adapter.boundary(trainer.global_step, value) is not None:
            trainer.should_stop = True
            return
        self._maybe_save(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = self.adapter.state()
        if state is not None:
            checkpoint["sentinel"] = state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._loaded_state = checkpoint.get("sentinel")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.adapter.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.adapter.close()

    # ---- checkpoints ----

    def _maybe_save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        sn = self.adapter.sentinel
        if self.dir is None or step % self.every or sn is None or sn.checkpoints is None:
            return
        path = self.dir / f"step-{step}.ckpt"
        try:
            trainer.save_checkpoint(path)
        except Exception:
            sn.errors += 1
            log.exception("sentinel: saving %s failed (training continues; it will not become good)", path)
            return
        self.adapter.saved(step, path)


def fit(
    trainer: pl.Trainer, model: pl.LightningModule, *args: Any, ckpt_path: str | None = None, **kwargs: Any
) -> None:
    """``trainer.fit()``, resumed from the checkpoint a rollback chose until training ends without one.

    Each resume is ``trainer.fit(model, ..., ckpt_path=PATH)``: Lightning restores the module,
    optimizer, schedulers, loop counters and, for a stateful dataloader, its position.
    """
    callback = next((c for c in trainer.callbacks if isinstance(c, SentinelCallback)), None)
    if callback is None:
        raise ValueError("the Trainer has no SentinelCallback: Trainer(..., callbacks=[SentinelCallback(...)])")
    trainer.fit(model, *args, ckpt_path=ckpt_path, **kwargs)
    while callback.adapter.resume_from is not None:
        path, callback.adapter.resume_from = callback.adapter.resume_from, None
        trainer.fit(model, *args, ckpt_path=path, **kwargs)
