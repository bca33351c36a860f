"""Sentinel for the Hugging Face ``Trainer``: a ``TrainerCallback`` and a ``train()`` that follows rollbacks.

    from sentinel.integrations.hf import SentinelCallback, train
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SentinelCallback("sentinel.yaml")])
    train(trainer)  # trainer.train(), resumed from sentinel's chosen checkpoint after a rollback

Hooks (transformers 5.x ``Trainer._inner_training_loop``): the optimizer and scheduler exist
from ``on_train_begin`` (after a resume has loaded them), so sentinel attaches there to the
torch optimizer inside accelerate's wrapper; its step hooks then see every
``optimizer.step()``.  ``on_step_end`` follows the update, the scheduler step and
``zero_grad``: it is the step boundary.  ``on_save`` reports each ``checkpoint-N`` folder.

The loss (``loss=``):

- ``"forward"`` (default): a forward hook on the model reads ``outputs.loss`` in training mode,
  on the device, no host sync.  Over gradient accumulation the micro-batch losses are summed
  when the Trainer passed ``num_items_in_batch`` (the model then normalised by the whole
  accumulated batch) and averaged otherwise, which is what the Trainer logs on one process.
  With ``num_items_in_batch`` and ``average_tokens_across_devices`` the count is global, so the
  sum is multiplied as ``Trainer.compute_loss`` multiplies it (:func:`forward_loss_scale`):
  each rank publishes its own loss, not its loss divided by the number of processes.
  A ``compute_loss`` override, ``compute_loss_func`` or label smoothing is not seen: the
  published loss is the model's own.
- ``"log"``: the loss the Trainer logs (``on_log``), exactly its number across ranks, but it
  needs ``logging_steps=1``, which makes the Trainer sync the device and log every step.

Rollback is stop-then-resume through the Trainer's own checkpoints (sentinel.integrations.checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sentinel import collectives
from sentinel.config import Config
from sentinel.integrations import missing
from sentinel.integrations.adapter import Adapter, AdapterViews, load
from sentinel.integrations.checkpoints import FrameworkCheckpoints

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise ImportError(missing("transformers", "hf")) from exc

__all__ = ["SentinelCallback", "train"]
log = logging.getLogger("sentinel")
LOSS_SOURCES = ("forward", "log")


def state_file() -> str:
    """Sentinel's transform state in a checkpoint folder, one file per rank."""
    return f"sentinel-rank{collectives.rank()}.pt"


def trainer_checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from by ``Trainer.train(resume_from_checkpoint=...)``, or None."""
    if not path.is_dir():
        return f"{path} does not exist (save_total_limit may have rotated it out)"
    if not (path / "trainer_state.json").is_file():
        return f"{path} has no trainer_state.json: the save never finished"
    return None


def forward_loss_scale(average_tokens_across_devices: bool, num_processes: int, tp_size: int, n_gpu: int) -> int:
    """The factor ``Trainer.compute_loss`` (transformers 5.x) multiplies the model's loss by.

    Why: with ``average_tokens_across_devices`` the ``num_items_in_batch`` the model normalises
    by is the token count gathered over all processes (``_get_num_items_in_batch``), so the
    loss a forward hook sees is the local sum over the global count; the Trainer then multiplies
    by ``num_processes // tp_size`` (by ``n_gpu`` under ``DataParallel``), and so does sentinel.
    """
    if not average_tokens_across_devices:
        return 1
    return num_processes // tp_size if n_gpu <= 1 else n_gpu


def _tp_size(args: TrainingArguments, model: Any) -> int:
    """``Trainer.get_tp_size`` from what a callback is given: the model, then DeepSpeed, then the parallelism config."""
    if (tp := getattr(model, "_tp_size", None)) is not None:
        return int(tp)
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is not None and getattr(args, "deepspeed", None):
        return int(ds.config.get("tensor_parallel", {}).get("autotp_size", 1))
    pc = getattr(args, "parallelism_config", None)
    return int(pc.tp_size) if pc is not None else 1


def trainer_loss_scale(args: TrainingArguments, model: Any, trainer: Trainer | None = None) -> int:
    """:func:`forward_loss_scale` for this run: from the Trainer's own accelerator and TP size when
    :func:`train` gave it, otherwise from ``args.world_size`` (the same accelerate state) and the model."""
    if trainer is not None:
        num_processes, tp = trainer.accelerator.num_processes, trainer.get_tp_size()
    else:
        num_processes, tp = args.world_size, _tp_size(args, model)
    return forward_loss_scale(
        bool(getattr(args, "average_tokens_across_devices", False)), num_processes, tp, args.n_gpu
    )


class SentinelCallback(AdapterViews, TrainerCallback):
    """Attach sentinel to the Trainer's model and optimizer and obey the agent's commands.

    ``config`` and keyword ``overrides`` are as for :func:`sentinel.attach` (YAML path, dict or
    Config; ``stats__every=10``).  ``checkpoint.good_after`` judges the Trainer's checkpoints;
    ``checkpoint.dir``/``every``/``keep`` are not used (``output_dir``, ``save_steps`` and
    ``save_total_limit`` are the Trainer's).  After training, ``sentinel`` is the (closed)
    handle of the last ``train()`` call and ``rollbacks`` lists the rollbacks done.
    """

    def __init__(self, config: str | Path | dict | Config | None = None, *, loss: str = "forward", **overrides: Any):
        if loss not in LOSS_SOURCES:
            raise ValueError(f"loss={loss!r}; allowed: {', '.join(LOSS_SOURCES)}")
        cfg = load(config, overrides)
        if cfg.checkpoint.dir is not None:
            log.warning(
                "sentinel: checkpoint.dir is not used with the Trainer: rollbacks go to the Trainer's own "
                "checkpoint-N folders (output_dir, save_steps)"
            )
        self.loss_source = loss
        self.adapter = Adapter(cfg, FrameworkCheckpoints(cfg.checkpoint.good_after, verify=trainer_checkpoint_problem))
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._hook: Any = None
        self._warned_no_loss = False
        self._resume_path: Path | None = None  # a checkpoint folder train() was asked to resume from
        self._trainer: Trainer | None = None  # set by train(): the loss scale is then the Trainer's own
        self.loss_scale = 1  # forward_loss_scale of this train() call

    # ---- hooks ----

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.loss_source == "log" and (args.logging_strategy != "steps" or args.logging_steps != 1):
            raise ValueError(
                "SentinelCallback(loss='log') needs logging_strategy='steps' and logging_steps=1, got "
                f"{getattr(args.logging_strategy, 'value', args.logging_strategy)!r} and {args.logging_steps}"
            )
        if model is None or optimizer is None:
            log.error("sentinel: the Trainer passed no model or optimizer to on_train_begin; sentinel is off")
            return
        self._remove_hook()
        resume = self.adapter.pending_resume
        folder, self._resume_path = (resume.path if resume is not None else self._resume_path), None
        scaler = getattr(getattr(self._trainer, "accelerator", None), "scaler", None)  # fp16: its loss scale
        self.adapter.attach(
            model, optimizer, lr_scheduler, state.global_step, self._read_state(folder), resumed=folder is not None,
            grad_scaler=scaler,
        )  # fmt: skip
        if self.loss_source == "forward":
            try:
                self.loss_scale = trainer_loss_scale(args, model, self._trainer)
            except Exception:
                self.loss_scale = 1
                log.exception("sentinel: could not read the Trainer's loss scale; the model's loss is published")
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        if args.save_strategy == "no":
            log.warning("sentinel: save_strategy='no': the Trainer saves no checkpoint, so a rollback cannot happen")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.loss_source == "forward":
            self._boundary(state, control, self._take_loss())

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        sn = self.adapter.sentinel
        if self.loss_source == "log" and logs and "loss" in logs and sn is not None and sn.step < state.global_step:
            self._boundary(state, control, float(logs["loss"]))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        path = Path(args.output_dir or ".") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        saved = self.adapter.state()
        if saved is not None and path.is_dir():
            try:
                torch.save(saved, path / state_file())
            except Exception:
                log.exception("sentinel: could not write %s (the transforms would start afresh from it)", path)
        self.adapter.saved(state.global_step, path)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hook()
        self.adapter.close()

    # ---- internals ----

    def _boundary(self, state: TrainerState, control: TrainerControl, loss: Any) -> None:
        outcome = self.adapter.boundary(state.global_step, loss)
        if outcome is not None:
            control.should_training_stop = True
        if outcome == "rollback":
            control.should_save = False  # the abandoned trajectory is not worth a checkpoint

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append((loss.detach(), kwargs.get("num_items_in_batch") is not None))

    def _take_loss(self) -> torch.Tensor | None:
        parts, self._losses = self._losses, []
        if not parts:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                log.warning(
                    "sentinel: the model returned no loss in training mode (a compute_loss override?); "
                    "no loss is published. SentinelCallback(loss='log') with logging_steps=1 publishes the Trainer's"
                )
            return None
        values = torch.stack([p.float().reshape(()) for p, _ in parts])
        return values.sum() * self.loss_scale if any(summed for _, summed in parts) else values.mean()

    @staticmethod
    def _read_state(folder: Path | None) -> dict[str, Any] | None:
        if folder is None:
            return None
        path = Path(folder) / state_file()
        if not path.is_file():
            log.warning("sentinel: %s has no %s: the transforms start afresh", folder, state_file())
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            log.exception("sentinel: could not read %s: the transforms start afresh", path)
            return None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._losses = []


def train(trainer: Trainer, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
    """``trainer.train()``, resumed from the checkpoint a rollback chose until training ends without one.

    Returns the last ``TrainOutput``.  Each resume is ``trainer.train(resume_from_checkpoint=PATH)``:
    the Trainer restores model, optimizer, scheduler, RNG and global step, and skips the batches
    already trained in that epoch, so the data position is the checkpoint's.
    """
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SentinelCallback)), None)
    if callback is None:
        raise ValueError("the Trainer has no SentinelCallback: Trainer(..., callbacks=[SentinelCallback(...)])")
    callback._trainer = trainer
    if isinstance(resume_from_checkpoint, (str, Path)):
        callback._resume_path = Path(resume_from_checkpoint)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
    while callback.adapter.resume_from is not None:
        path, callback.adapter.resume_from = callback.adapter.resume_from, None
        output = trainer.train(resume_from_checkpoint=path, **kwargs)
    return output
