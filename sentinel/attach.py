"""``sentinel.attach``: hooks on the user's own model and optimizer, and the handle it returns.

The optimizer is never subclassed or wrapped: sentinel registers step pre/post hooks, so
LR schedulers, GradScaler and ``optimizer.state_dict()`` see the object they always saw.
Nothing sentinel does may crash or stall the trainer: every hook catches its own errors,
logs them once with the traceback, and turns statistics off rather than fail a step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sentinel import stabilise
from sentinel.adam import GroupEps, is_adam
from sentinel.checkpoint import CheckpointManager
from sentinel.config import Config, load_config
from sentinel.control import Control
from sentinel.data import BatchPosition
from sentinel.gradnorms import GradNorms
from sentinel.optim import Chain, Guard, StepContext, fused_step, optimizer_params
from sentinel.optim import build as build_transforms
from sentinel.probes import Probes
from sentinel.publish import HostTransfer, Publisher
from sentinel.rank_reduce import RankReduce
from sentinel.role_report import RoleGaps, find_gaps
from sentinel.row_roles import param_roles, require, role_map_or_error
from sentinel.run_name import default_run_name
from sentinel.stats import StatsTap, TensorStats
from sentinel.te import Fp8CacheRefresh, is_te_module
from sentinel_contract.protocol import Layout

log = logging.getLogger("sentinel")
STATE_VERSION = 1


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class Sentinel:
    """The handle returned by :func:`attach`. Call :meth:`observe` once per training step."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config,
        lr_scheduler: Any = None,
        grad_scaler: Any = None,
    ):
        self.config = config
        self.model, self.optimizer = model, optimizer
        self.step = 0
        self.errors = 0
        self.events: list[dict[str, Any]] = []
        self.position = BatchPosition()
        self.run = config.run or default_run_name()
        self.rank = _dist_rank()
        self._hooks: list[Any] = []
        self._sources: list[Any] = []  # extra statistics: callables returning [(Layout, packed tensor)]
        self.fp8_refresh: Fp8CacheRefresh | None = None
        self._pre_hook: Any = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._clip: torch.Tensor | None = None  # grad_clip_factor of the step being taken, then of _pending
        self._pending_clip: torch.Tensor | None = None
        self._layouts: dict[tuple, Layout] = {}
        self.grads: GradNorms | None = None
        self._eps: GroupEps | None = None
        self._roles: tuple[str, ...] = ()
        self._last_time = time.perf_counter()  # step 0's duration is measured from attach
        self._transfer = HostTransfer()
        self.stats: TensorStats | None = None
        self.chain: Chain | None = None
        self.guard: Guard | None = None
        self._ctx: StepContext | None = None
        self.publisher: Publisher | None = None
        self.job: RankReduce | None = None  # job-level loss, step time and errors (one all-reduce a step)
        self._closed_counts: tuple[int, int] = (0, 0)  # the publisher's (sent, dropped) once closed
        self.lr_scheduler = lr_scheduler
        self.checkpoints: CheckpointManager | None = None
        self.control: Control | None = None
        self.probes: Probes | None = None
        self.role_gaps: RoleGaps | None = None
        logging.getLogger("sentinel").setLevel(config.log_level.upper())
        if not config.enabled:
            log.info("sentinel: disabled by config; no hooks installed")
            return

        self._params, self._group_of = optimizer_params(optimizer)
        param_names = {id(p): n for n, p in model.named_parameters()}
        self._names = tuple(
            param_names.get(id(p), f"group{g}.param{i}") for i, (p, g) in enumerate(zip(self._params, self._group_of))
        )
        role_map, role_error = role_map_or_error(model, config)  # once, for every part that needs roles
        st = config.stabilise
        if st.init != "keep" or st.scaled_embed or st.embed_ln:
            self._stabilisers = stabilise.apply(model, st, require(role_map, role_error))
            self._hooks += self._stabilisers.hooks
        transforms = build_transforms(
            model, optimizer, config, self._params, self._group_of, self._names, role_map=role_map
        )
        self.fp8_refresh = Fp8CacheRefresh(model) if any(map(is_te_module, model.modules())) else None
        if st.init != "keep" or (config.optim.wesar.enabled and config.optim.wesar.init == "wesar"):
            self.weights_changed("re-initialisation at attach")
        self.guard = transforms["guard"]
        if config.stats.enabled:
            mode = config.stats.update
            if mode == "auto":
                mode = "reconstruct" if is_adam(optimizer) else "copy"
            if mode == "reconstruct" and not is_adam(optimizer):
                raise ValueError(
                    f"stats.update='reconstruct' needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}; "
                    "use 'copy' or 'off'"
                )
            self.stats = TensorStats(
                optimizer, self._params, self._group_of, self._names, mode, config.stats.chunk_elements
            )
            transforms["stats"] = StatsTap(self.stats, self._stats_due)
            extra = (
                f", holding a {self.stats.snapshot_bytes / 2**20:.1f} MiB parameter copy during statistics steps"
                if mode == "copy"
                else ""
            )
            log.info(
                "sentinel: statistics every %d step(s) on %d tensors, update measured by '%s'%s",
                config.stats.every,
                len(self.stats.params),
                mode,
                extra,
            )
        if role_error is not None:
            log.warning("sentinel: no role map (%s); parameter rows are sent as 'matrix' or 'vector'", role_error)
        self._roles = param_roles(role_map, self._names, self._params)
        if is_adam(optimizer):
            self._eps = GroupEps(optimizer, self._group_of, self._params)
        self.chain = Chain(transforms, fused=fused_step(optimizer, config, self._params, self._group_of, transforms))
        if config.stats.enabled or config.optim.guard.enabled:
            self.grads = GradNorms.create(self._params, grad_scaler)
            if self.grads is not None:
                self.grads.arm()  # the first step, whatever its number (the integrations set sn.step after attach)
        on = [name for name in transforms if name not in ("guard", "stats")] + (
            ["guard"] if config.optim.guard.enabled else []
        )
        if on:
            log.info("sentinel: optimizer transforms on: %s", ", ".join(on))
        self._pre_hook = optimizer.register_step_pre_hook(self._before_step)
        self._hooks.append(self._pre_hook)
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        publishes = config.publish.ranks == "all" or self.rank == 0
        if config.publish.enabled and config.publish.job_scalars:
            self.job = RankReduce.create(self._params)  # on every rank: a collective each observe()
        if config.publish.enabled and publishes:
            pub = config.publish
            self.publisher = Publisher(
                pub.endpoint, self.run, self.rank, pub.queue, curve=pub.curve, insecure=pub.insecure
            )
            log.info("sentinel: run %r rank %d publishing to %s", self.run, self.rank, config.publish.endpoint)
        self.checkpoints = CheckpointManager.create(self, config.checkpoint)
        self.control = Control(self, config.control)
        if config.probes.enabled and self.publisher is not None:  # ranks that publish nothing probe nothing
            self.probes = Probes.start(model, config.probes, role_map)
        self.role_gaps = self._report_gaps(role_map)

    def _report_gaps(self, role_map: Any) -> RoleGaps | None:
        """One WARNING naming every matrix without a role and every block without attention, with the fix."""
        if role_map is None:
            return None
        try:
            gaps = find_gaps(role_map, self.config, self.probes.plan if self.probes is not None else None)
        except Exception:
            log.exception("sentinel: the role-map report failed (training continues)")
            return None
        if gaps.any:
            log.warning("%s", gaps.text())
        elif gaps.trace_error:
            log.warning("sentinel roles: %s; the parameter-name presets assigned every matrix", gaps.trace_error)
        return gaps

    def _stats_due(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return self.stats is not None and "stats" in self.chain.transforms and step % self.config.stats.every == 0

    def _guard_detects(self) -> bool:
        return self.guard is not None and self.guard.detect and "guard" in self.chain.transforms

    @property
    def skipped_updates(self) -> int:
        return self.guard.skips if self.guard is not None else 0

    @property
    def should_stop(self) -> bool:
        """True once a ``stop`` command was applied; ``sn.batches()`` then ends at its next batch."""
        return self.position.stopped

    def skip_updates(self, n: int, reason: str) -> None:
        """Skip the next ``n`` optimizer updates, leaving parameters and optimizer state untouched.

        The guard drops the gradients before the step, so the optimizer sees no parameter to
        update (Adam's step counters do not advance). ``reason`` is logged as the evidence.
        """
        if self.guard is None:
            log.error("sentinel: cannot skip updates: sentinel is disabled (no hooks installed)")
            return
        self.guard.skip_next(n)
        log.warning("sentinel: skipping the next %d optimizer update(s) from step %d: %s", n, self.step, reason)

    def defer_pre_step(self) -> None:
        """Run the pre-update transforms from :meth:`pre_step`, called by the loop, instead of a step pre-hook.

        For loops that pass a closure to ``optimizer.step(closure)`` (Lightning's automatic
        optimization): the closure computes the gradients inside the step, after a pre-hook has
        run, so the guard and the statistics must run later, once the gradients exist.
        """
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._hooks.remove(self._pre_hook)
            self._pre_hook = None

    def pre_step(self) -> None:
        """The pre-update transforms (guard, statistics) for the coming update; see :meth:`defer_pre_step`."""
        if self.chain is not None:
            self._before_step(self.optimizer, (), {})

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._ctx = ctx = StepContext(step=self.step, params=self._params, names=self._names, group_of=self._group_of)
        stats_due = self._stats_due()
        self._clip = None
        if self.grads is not None and (stats_due or self._guard_detects()):
            ctx.pre_clip = self.grads.measure(received=stats_due)  # never raises
            self._clip = ctx.pre_clip.clip if ctx.pre_clip is not None else None
        self._drop_failed_grads()
        self._run_chain(self.chain.before_step)

    def _drop_failed_grads(self) -> None:
        if self.grads is not None and self.grads.failed:  # logged by GradNorms: statistics read the step's gradients
            self.errors += 1
            self.grads.close()
            self.grads = None

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        self._run_chain(self.chain.after_step)
        if self.fp8_refresh is not None and ("wesar" in self.chain.transforms or "clamp" in self.chain.transforms):
            self.weights_changed("WeSaR/clamp after the step")
        if self.stats is not None and "stats" in self.chain.transforms:
            tap = self.chain.transforms["stats"]
            self._pending, tap.pending = tap.pending, None
            self._pending_clip = self._clip if self._pending is not None else None
        self.events.extend(ctx.events)
        del self.events[:-1000]

    def _run_chain(self, fn: Any) -> None:
        errors = self.chain.errors
        fn(self._ctx)
        self.errors += self.chain.errors - errors
        if self.stats is not None and "stats" not in self.chain.transforms:
            self.stats = None

    def observe(self, loss: torch.Tensor | float | None = None, **scalars: torch.Tensor | float) -> None:
        """Mark the end of a training step and publish what was measured during it.

        ``loss`` and any other scalars (tensors stay on the device; no host sync here).  A
        ``grad_norm`` given here is published instead of the measured one (under DDP, pass
        ``clip_grad_norm_``'s return value: the pre-clip global norm, which sentinel cannot see there).
        """
        now = time.perf_counter()
        grad_norm = scalars.get("grad_norm", self._pending[1] if self._pending is not None else None)
        try:
            job = self.job(loss, self.errors) if self.job is not None else {}  # every rank, before publishing
            self._publish(now, loss, {**scalars, **job} if self.rank == 0 else scalars)
        except Exception:
            self.errors += 1
            log.exception("sentinel: publishing failed at step %d (training continues)", self.step)
        self._last_time = now
        self.step += 1
        if self.probes is not None:
            self.probes.begin_step(self.step)  # hooks only for the forward of a sampled step
        if self.grads is not None:  # gradient hooks only for the backward of a step that reads them
            if self._stats_due(self.step) or self._guard_detects():
                self.grads.arm()
            else:
                self.grads.disarm()
            self._drop_failed_grads()
        if self.control is not None:
            self.control.boundary(loss, grad_norm)  # commands, then checkpoints; never raises
        if self.job is not None:
            self.job.left()

    def add_source(self, collect: Any) -> None:
        """Publish what ``collect()`` returns, ``[(Layout, packed float32 tensor)]``, with every ``observe()``."""
        self._sources.append(collect)

    def weights_changed(self, reason: str) -> None:
        """Sentinel wrote weights outside the optimizer's update: cached low-precision copies must be re-cast."""
        if self.fp8_refresh is not None:
            self.fp8_refresh.mark_stale(reason)

    def _publish(self, now: float, loss: Any, scalars: dict[str, Any]) -> None:
        pending, self._pending = self._pending, None
        clip, self._pending_clip = self._pending_clip, None
        probed = self.probes.collect() if self.probes is not None else []
        for collect in self._sources:
            try:
                probed += collect()
            except Exception:
                self.errors += 1
                log.exception("sentinel: statistics source %r failed (training continues)", collect)
        if self.publisher is None:
            return
        for lay, packed in probed:  # probe messages first: the step's own message stays the latest
            for data, (step, out) in self._transfer.submit(packed, (self.step, lay)):
                self.publisher.publish(step, out, data)
        values: dict[str, Any] = {}
        if loss is not None:
            values["loss"] = loss
        values.update(scalars)
        if self.role_gaps is not None:
            for name, value in self.role_gaps.scalars().items():
                values.setdefault(name, value)
        if pending is not None:
            values.setdefault("grad_norm", pending[1])  # the user's, when given
            if clip is not None:
                values["grad_clip_factor"] = clip
        if self.chain is not None:
            values.update(self.chain.scalars())
        if self._eps is not None:
            values.setdefault("adam_eps", self._eps.minimum())  # the ε tuner's, when on
        if self.optimizer.param_groups:
            values.setdefault("lr", float(self.optimizer.param_groups[0]["lr"]))
        values["step_duration_seconds"] = now - self._last_time
        device = pending[0].device if pending is not None else torch.device("cpu")
        parts = [
            torch.stack(
                [torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(()) for v in values.values()]
            )
        ]
        stat_names: tuple[str, ...] = ()
        if pending is not None:
            matrix, stat_names = pending[0], self.stats.stats
            extra = self.chain.columns()
            if self._eps is not None and "adam_eps" not in extra:  # the tuner's ε when it is on, else the group's
                extra["adam_eps"] = self._eps.column()
            if extra:
                matrix = torch.cat([matrix, torch.stack([c.to(matrix) for c in extra.values()], dim=1)], dim=1)
                stat_names += tuple(extra)
            parts.append(matrix.reshape(-1))
        layout = self._layout(tuple(values), stat_names, pending is not None)
        for data, (step, lay) in self._transfer.submit(torch.cat(parts), (self.step, layout)):
            self.publisher.publish(step, lay, data)

    def _layout(self, scalars: tuple[str, ...], stats: tuple[str, ...], rows: bool) -> Layout:
        """The message layout, made once per combination (its hash covers every tensor name)."""
        key = (scalars, stats, rows)
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) > 64:
                self._layouts.clear()
            tensors, roles = (self._names, self._roles) if rows else ((), ())
            lay = self._layouts[key] = Layout(scalars=scalars, stats=stats, tensors=tensors, roles=roles)
        return lay

    def batches(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Iterate ``iterable`` as one pass, tracking the position for resumption."""
        return self.position.iterate(iterable)

    def state_dict(self) -> dict[str, Any]:
        state = {"version": STATE_VERSION, "step": self.step, "data": self.position.state_dict()}
        if self.chain is not None:
            state["optim"] = self.chain.state_dict()
        if self.control is not None:
            state["control"] = self.control.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sentinel state version {state.get('version')!r}, this sentinel reads {STATE_VERSION}")
        self.step = int(state["step"])
        self.position.load_state_dict(state["data"])
        if self.chain is not None and "optim" in state:
            self.chain.load_state_dict(state["optim"])
        if self.control is not None and "control" in state:
            self.control.load_state_dict(state["control"])

    @property
    def counters(self) -> dict[str, int]:
        pub = self.publisher
        sent, dropped = (pub.sent, pub.dropped) if pub else self._closed_counts
        return {
            "steps": self.step,
            "sent": sent,
            "dropped": dropped,
            "errors": self.errors,
        }

    def close(self) -> None:
        """Flush in-flight statistics, remove every hook, close the socket. Idempotent."""
        if self.control is not None:
            self.control.close()
        if self.checkpoints is not None:
            self.checkpoints.close()
        if self.publisher is not None:
            for data, (step, lay) in self._transfer.ready(wait=True):
                self.publisher.publish(step, lay, np.asarray(data))
            self.publisher.close()
            self._closed_counts = (self.publisher.sent, self.publisher.dropped)
            self.publisher = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.grads is not None:
            self.grads.close()
        if self.probes is not None:
            self.probes.close()
        if self.fp8_refresh is not None:
            self.fp8_refresh.close()

    def __enter__(self) -> Sentinel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: str | Path | dict | Config | None = None,
    *,
    lr_scheduler: Any = None,
    grad_scaler: Any = None,
    **overrides: Any,
) -> Sentinel:
    """Attach sentinel to ``model`` and ``optimizer``.

    ``config`` is a YAML path, a dict or a :class:`Config`; keyword overrides take dotted
    keys as ``stats__every=10`` or plain ``run="exp1"``.  ``lr_scheduler`` (optional) is
    checkpointed with the model and kept in step by the agent's ``lr_scale`` command.
    ``grad_scaler`` (optional, a ``torch.amp.GradScaler``): the gradient hooks see the scaled
    gradients of mixed-precision training, and its scale, read at each step, divides them;
    without it the pre-clip norms of a scaled run are in scaled units.
    """
    overrides = {k.replace("__", "."): v for k, v in overrides.items()}
    cfg = load_config(config, **overrides)
    return Sentinel(model, optimizer, cfg, lr_scheduler=lr_scheduler, grad_scaler=grad_scaler)
