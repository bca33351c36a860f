"""A resumable batch iterator: the data position is part of sentinel's state_dict.

A resumed run must see exactly the batches it would have seen (PaLM's recipe of skipping
batches after a rollback needs the same position bookkeeping).  ``sn.batches(loader)`` is
one pass over ``loader``; its position is (pass, index).  After ``load_state_dict`` the next
pass fast-forwards to the saved index by drawing and discarding batches; a deterministic
loader (seeded sampler, no shuffling without a seed) therefore resumes bit-for-bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class BatchPosition:
    def __init__(self) -> None:
        self.epoch = 0
        self.index = 0
        self._resume_index = 0

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        skip, self._resume_index = self._resume_index, 0
        self.index = 0
        for i, batch in enumerate(iterable):
            if i < skip:
                continue
            self.index = i + 1
            yield batch
        self.epoch += 1
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = self._resume_index = int(state["index"])
