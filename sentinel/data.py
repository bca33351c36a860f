"""Resumable, skippable batches: the data position is part of sentinel's state_dict.

Why: a rollback must return to exactly the batch its checkpoint was taken at, and PaLM's
recipe then skips a few hundred batches around the spike.  Both are index arithmetic, cheap
only if the loader can start at an index instead of loading and discarding what it skips.

``sn.batches(loader)`` is one pass over ``loader``; the position is (epoch, index), where
``index`` is the next batch of the pass (batches yielded plus batches skipped).  A skip or a
restored position takes effect at the next ``next()``, by re-opening the pass at the index:

- ``torch.utils.data.DataLoader`` over a map-style dataset with a batch sampler: a new
  DataLoader with the same settings draws its batches from a batch sampler that starts at the
  index; skipped batches cost their index lists, never a ``dataset[i]``.  To make the resumed
  pass the same permutation as the original, the generators the pass drew from when it began
  (torch's global generator, the loader's and the sampler's) are recorded then and replayed
  when it is re-opened; the global generator is left as it was.
- a sequence (list, tuple): indexed directly.
- anything else (iterable datasets, generators): fast-forwarded by drawing and discarding.

A skip that runs past the end of a pass carries its remainder into the next pass.  When
``stop()`` is called (the agent's ``stop`` command), the iterator ends at the next ``next()``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

log = logging.getLogger("sentinel")


class BatchPosition:
    def __init__(self) -> None:
        self.epoch = 0
        self.index = 0
        self.skipped = 0
        self.stopped = False
        self._pass_rng: dict[str, Any] | None = None  # generators as the current pass began
        self._begun = False  # the current pass has drawn its generators
        self._version = 0  # bumped by skip/load_state_dict: a live pass re-opens at self.index

    def skip(self, n: int, reason: str = "") -> None:
        """Advance the position by ``n`` batches without loading them (at the next ``next()``)."""
        self.index += n
        self.skipped += n
        self._version += 1
        log.warning(
            "sentinel: skipping %d batch(es); data position now epoch %d index %d%s",
            n,
            self.epoch,
            self.index,
            f": {reason}" if reason else "",
        )

    def stop(self) -> None:
        self.stopped = True

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        it: Iterator[Any] = iter(())
        version = -1
        while not self.stopped:
            if version != self._version:
                version = self._version
                it, carry = self._open(iterable)
                if carry:
                    self._end_pass(carry)
                    return
            try:
                batch = next(it)
            except StopIteration:
                break
            self.index += 1
            yield batch
        else:
            log.warning("sentinel: stop requested; batches() ends at epoch %d index %d", self.epoch, self.index)
            return
        self._end_pass(0)

    def _end_pass(self, carry: int) -> None:
        self.epoch += 1
        self.index = carry
        self._pass_rng = None
        self._begun = False

    def _open(self, iterable: Iterable[Any]) -> tuple[Iterator[Any], int]:
        """An iterator positioned at ``self.index``, and how far the index lies past the end (0 if inside)."""
        start = self.index
        if not self._begun:
            self._begun = True
            self._pass_rng = _capture(iterable)
            if start == 0:
                return iter(iterable), 0
        if _startable(iterable):
            n = len(iterable.batch_sampler)
            if start >= n:
                return iter(()), start - n
            return _start_loader(iterable, start, self._pass_rng), 0
        if isinstance(iterable, Sequence):
            if start >= len(iterable):
                return iter(()), start - len(iterable)
            return (iterable[i] for i in range(start, len(iterable))), 0
        it = iter(iterable)
        for done in range(start):
            if next(it, _END) is _END:
                return iter(()), start - done
        if start:
            log.info(
                "sentinel: fast-forwarded %d batch(es) by loading them (this loader cannot start at an index)", start
            )
        return it, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index}
        if self._pass_rng is not None:
            state["pass_rng"] = self._pass_rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._pass_rng = state.get("pass_rng")
        self._begun = self._pass_rng is not None or self.index > 0
        self._version += 1


_END = object()


def _startable(loader: Any) -> bool:
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
        and hasattr(loader.batch_sampler, "__len__")
    )


def _sampler_generator(loader: DataLoader) -> torch.Generator | None:
    gen = getattr(getattr(loader.batch_sampler, "sampler", None), "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _capture(iterable: Iterable[Any]) -> dict[str, Any] | None:
    """What a DataLoader pass draws from as it begins: needed to replay it from an index."""
    if not _startable(iterable):
        return None
    loader: DataLoader = iterable  # type: ignore[assignment]
    sampler = getattr(loader.batch_sampler, "sampler", None)
    gen = _sampler_generator(loader)
    reused = loader.persistent_workers and loader.num_workers > 0 and getattr(loader, "_iterator", None) is not None
    return {
        "global": torch.get_rng_state(),
        "loader": loader.generator.get_state() if loader.generator is not None else None,
        "sampler": gen.get_state() if gen is not None else None,
        "base_from_global": loader.generator is None and not reused,
        "sampler_epoch": getattr(sampler, "epoch", None) if isinstance(getattr(sampler, "epoch", None), int) else None,
    }


class _StartAt(Sampler):
    """The loader's batch sampler from batch ``start`` on, drawn as the original pass drew it."""

    def __init__(self, loader: DataLoader, start: int, snapshot: dict[str, Any] | None):
        self.batches, self.start, self.snapshot = loader.batch_sampler, start, snapshot
        self.generator = _sampler_generator(loader)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        snap = self.snapshot
        saved = torch.get_rng_state()
        try:
            if snap is not None:
                torch.set_rng_state(snap["global"])
                if snap["base_from_global"]:
                    torch.empty((), dtype=torch.int64).random_()  # the original pass's worker base seed
                if self.generator is not None and snap["sampler"] is not None:
                    self.generator.set_state(snap["sampler"])
            it = iter(self.batches)
            first = next(itertools.islice(it, self.start, None), None)
        finally:
            torch.set_rng_state(saved)
        if first is None:
            return
        yield first
        yield from it


def _start_loader(loader: DataLoader, start: int, snapshot: dict[str, Any] | None) -> Iterator[Any]:
    """A DataLoader equal to ``loader`` whose pass starts at batch ``start``."""
    sampler = getattr(loader.batch_sampler, "sampler", None)
    if snapshot is not None and snapshot.get("sampler_epoch") is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(snapshot["sampler_epoch"])
    generator = loader.generator
    if generator is not None and snapshot is not None and snapshot["loader"] is not None:
        generator.set_state(snapshot["loader"])
    elif generator is None:
        generator = torch.Generator()
        generator.set_state(snapshot["global"] if snapshot is not None else torch.get_rng_state())
    resumed = DataLoader(
        loader.dataset,
        batch_sampler=_StartAt(loader, start, snapshot),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )
    return iter(resumed)
