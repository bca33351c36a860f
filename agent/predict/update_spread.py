"""Fragile small matrices (Nishida et al., *Initialization of Large Language Models via
Reparameterization to Mitigate Loss Spikes*, arXiv:2406.16297, §3.3 and Fig. 1): matrices whose
norm is far below the others' (W_o and W_d under residual scaling) take far larger update ratios,
and the loss spikes come from them.

The statistic is the spread max / median of ``update_ratio`` over the weight matrices of a message
(roles from the trainer), on a log scale, against ``max_spread``.  Lines are watched once the
spread reaches ``watch_from``: the zoo's stable runs of 2-layer models stay below 5 (a 2-layer
model's residual scaling is 1/√4; a 40-layer model's 1/√80 makes the W_d of Fig. 1 about 9×).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from agent.predict.fit import median
from agent.predict.roles import matrix_rows
from agent.predict.trend import TrendPredictor, curve, fit_rows
from sentinel_contract.typedconfig import option


@dataclass
class UpdateSpreadConfig:
    enabled: bool = option(True, doc="Watch the spread (max / median) of the matrices' update ratios.")
    max_spread: float = option(32.0, range=(1.0, 1e6), doc="Spread treated as divergence.")
    watch_from: float = option(8.0, range=(1.0, 1e6), doc="Spreads below this are not extrapolated.")


class UpdateSpread(TrendPredictor):
    name = "update_ratio_spread"
    key = "update_ratio_spread"
    Config = UpdateSpreadConfig
    stat = "update_ratio"

    def __init__(self, cfg, run: str = "", rank: int = 0):
        super().__init__(cfg, run, rank)
        self._spread: deque[tuple[int, float, str, int]] = deque(maxlen=max(4, cfg.trend.window_steps + 1))

    def observe(self, msg) -> None:
        col = msg.matrix[:, msg.layout.stats.index(self.stat)].astype(np.float64)
        exclude = tuple(self.cfg.update_ratio.exclude)
        keep = matrix_rows(msg.layout, exclude) & np.isfinite(col) & (col > 0)
        vals = col[keep]
        if len(vals) < 4:
            return
        if self._spread and msg.step <= self._spread[-1][0]:
            self._spread.clear()
        top = int(vals.argmax())
        self._spread.append(
            (msg.step, float(vals[top] / median(vals)), msg.layout.tensors[int(np.flatnonzero(keep)[top])], len(vals))
        )

    def past_limit(self, msg) -> bool:
        return bool(self._spread) and self._spread[-1][0] == msg.step and self._spread[-1][1] >= self.c.max_spread

    def rewind(self, to_step: int) -> None:
        super().rewind(to_step)
        self._spread.clear()

    def forecasts(self, msg, series):
        if not self._spread or self._spread[-1][0] != msg.step:
            return []
        step, spread, largest, matrices = self._spread[-1]
        if spread < self.c.watch_from:
            return []
        pts = [p for p in self._spread if p[0] >= step - self.trend.window_steps]
        steps = np.array([p[0] for p in pts])
        values = np.array([p[1] for p in pts])
        line = fit_rows(steps, np.log(values)[:, None], np.ones((len(values), 1), bool), self.trend)[0]
        eta, severity, risk = self.judge(line, math.log(spread), math.log(self.c.max_spread))
        if eta is None:
            return []
        head = f"update_ratio spread (max/median over {matrices} matrices) is {spread:.3g}; largest: {largest}"
        message = head if eta == 0.0 else f"{head}; ETA to {self.c.max_spread:g}: {eta:.0f} steps"
        fc = curve(steps, values, line, self.c.max_spread, "log")
        return [
            self.forecast(largest, self.stat, spread, step, eta, severity, risk, message, line, fc, matrices=matrices)
        ]
