"""NaN and ±Inf: a non-finite ``loss`` or ``grad_norm`` is a critical ``nonfinite`` detection at once,
with no warm-up (Megatron-LM treats it as fatal); a non-finite value in any other scalar or
per-tensor statistic is a ``nonfinite`` warning naming it.  One detection per episode: an episode
lasts while the value stays non-finite in the messages that carry it (a message without it, such
as the probes' own, neither ends nor repeats it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.predict.base import Detection, Predictor
from sentinel_contract.protocol import StatsMessage
from sentinel_contract.typedconfig import option

PRIMARY = ("loss", "grad_norm")


@dataclass
class NonfiniteConfig:
    enabled: bool = option(True, doc="Report NaN/Inf in the loss, the gradient norm and every other statistic.")


class Nonfinite(Predictor):
    name = key = "nonfinite"
    Config = NonfiniteConfig
    kind = "event"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self._bad: set = set()  # what is non-finite now: "loss", "grad_norm", or ("*", layout) for the rest

    def wants(self, msg: StatsMessage) -> bool:
        return True

    def update(self, msg: StatsMessage, series) -> list[Detection]:
        out = []
        for name in PRIMARY:
            v = msg.scalar(name)
            if v is None:
                continue  # not in this message: its episode goes on
            if math.isfinite(v):
                self._bad.discard(name)
                continue
            if name not in self._bad:
                out.append(Detection(self.run, self.rank, msg.step, self.name, "critical", name, v,
                                     f"{name} is {v} at step {msg.step}", evidence={"value": v}))  # fmt: skip
            self._bad.add(name)
        others = [
            n for n, v in zip(msg.layout.scalars, msg.scalars.tolist()) if n not in PRIMARY and not math.isfinite(v)
        ]
        if not np.isfinite(msg.matrix).all():
            rows, cols = np.nonzero(~np.isfinite(msg.matrix))
            others += [
                f"{msg.layout.tensors[r]}/{msg.layout.stats[c]}" for r, c in zip(rows[:5].tolist(), cols[:5].tolist())
            ]
        key = ("*", msg.layout)
        if not others:
            self._bad.discard(key)
            return out
        if key not in self._bad and not self._bad & set(PRIMARY) and not out:
            out.append(Detection(self.run, self.rank, msg.step, self.name, "warning", others[0], math.nan,
                                 f"non-finite statistics at step {msg.step}: {', '.join(others[:5])}",
                                 evidence={"names": others[:5]}))  # fmt: skip
        self._bad.add(key)
        return out

    def rewind(self, to_step: int) -> None:
        self._bad.clear()
