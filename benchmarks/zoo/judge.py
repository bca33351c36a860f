"""What counts as a divergence, a warning in time, a false alarm and a prevented divergence.

**Divergence**, defined once: the run's loss leaves its stable twin's noise band.  The band is how
far two healthy runs of the twin's configuration on the same batches drift apart: the largest
|trailing mean over ``WINDOW`` steps of (twin − twin from another initialisation)| after the first
``SETTLE`` steps.  A run diverges at the first step from ``SETTLE`` on where the trailing mean of
(run − twin) stays above the band for ``PERSIST`` consecutive steps, or where its loss is not finite.
The first ``SETTLE`` steps are the initial transient, where the twins themselves differ most and
no trend has points yet.

Per run, in trained steps (a rollback's retrained steps included):

* a **warning** is any agent detection (a ``decision`` or ``suppressed`` record);
* **recall**: divergent runs whose mechanism has a precursor, warned at or before their divergence;
  **lead** = divergence step − first warning;
* **precision**: warnings on runs that diverge, at or before the divergence / all warnings but those
  after a divergence (which predict nothing);
* **false warnings** per 1,000 clean steps: warnings on the clean runs (the twins, the noise twins and
  the clean scenarios) per 1,000 of their steps; **false actions**: corrective commands on them;
* **prevented**: a divergent run whose preventive arm finishes (validation loss on held-out
  batches) within the twin's band of the twin's validation loss, or below it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from benchmarks.zoo.runner import CORRECTIVE, Arm

WINDOW = 20
SETTLE = 50
PERSIST = 5


def trailing(x: np.ndarray, w: int = WINDOW) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.maximum(0, np.arange(len(x)) - w + 1)
    return (c[1:] - c[lo]) / (np.arange(len(x)) + 1 - lo)


def band(twin: list[float], other: list[float]) -> float:
    n = min(len(twin), len(other))
    d = trailing(np.array(twin[:n]) - np.array(other[:n]))[SETTLE:]
    return float(np.abs(d).max()) if len(d) else math.inf


def divergence_step(run: list[float], twin: list[float], width: float) -> int | None:
    n = min(len(run), len(twin))
    x, y = np.array(run[:n]), np.array(twin[:n])
    bad = ~np.isfinite(x)
    if bad[:SETTLE].any():
        return int(np.argmax(bad))
    over = (trailing(np.where(bad, 1e9, x) - y) > width) | bad
    for t in range(SETTLE, n - PERSIST + 1):
        if over[t : t + PERSIST].all():
            return t
    return None


@dataclass
class Row:
    """One (scenario, seed) of the zoo, judged."""

    scenario: str
    group: str
    seed: int
    precursor: bool
    band: float
    diverged: int | None
    first_warning: int | None
    lead: int | None
    warnings: int  # on the advisory run, up to the divergence (or all, if it did not diverge)
    late_warnings: int  # after the divergence
    detectors: list[str]
    val: dict[str, float] = field(default_factory=dict)  # arm -> validation loss
    actions: dict[str, str] = field(default_factory=dict)  # arm -> corrective commands applied
    prevented: bool | None = None
    reacted: bool | None = None


def judge(scenario, seed: int, advise: Arm, twin: Arm, noise: Arm, watch: Arm | None, prevent: Arm | None) -> Row:
    width = band(twin.result.losses, noise.result.losses)
    div = divergence_step(advise.result.losses, twin.result.losses, width)
    times = sorted(d["trained"] for d in advise.detections if d["trained"] is not None)
    cut = div if div is not None else math.inf
    before = [t for t in times if t <= cut]
    first = before[0] if before else None
    row = Row(scenario.name, scenario.group, seed, scenario.precursor, width, div, first,
              None if (div is None or first is None) else div - first, len(before), len(times) - len(before),
              sorted({f"{d['detector']}/{d['severity'][0]}@{d['trained']}" for d in advise.detections if d["trained"] is not None and d["trained"] <= cut + 50},
                     key=lambda s: int(s.rsplit("@", 1)[1]))[:6])  # fmt: skip
    row.val = {"twin": twin.result.val, "advise": advise.result.val}
    for name, arm in (("watch", watch), ("prevent", prevent)):
        if arm is None:
            continue
        row.val[name] = arm.result.val
        row.actions[name] = ",".join(f"{a}@{t}" for a, t, s in arm.applied if a in CORRECTIVE and s == "applied") or "-"
        ok = math.isfinite(arm.result.val) and arm.result.val <= twin.result.val + width
        if div is not None:
            setattr(row, "prevented" if name == "prevent" else "reacted", ok)
    return row


def clean_tally(arms: list[Arm]) -> tuple[int, int, int]:
    """(warnings, steps, corrective commands applied) over clean runs."""
    warnings = sum(len(a.detections) for a in arms)
    steps = sum(len(a.result.losses) for a in arms)
    actions = sum(1 for a in arms for act, _, s in a.applied if act in CORRECTIVE and s == "applied")
    return warnings, steps, actions


def summary(rows: list[Row], clean: tuple[int, int, int]) -> dict:
    divergent = [r for r in rows if r.diverged is not None and r.precursor]
    caught = [r for r in divergent if r.first_warning is not None]
    leads = [r.lead for r in caught]
    all_warnings = sum(r.warnings for r in rows) + clean[0]  # a warning after the divergence predicts nothing
    true_warnings = sum(r.warnings for r in rows if r.diverged is not None)
    attempted = [r for r in rows if r.prevented is not None]
    warnings, steps, actions = clean
    return {
        "recall": len(caught) / len(divergent) if divergent else math.nan,
        "median_lead": statistics.median(leads) if leads else math.nan,
        "min_lead": min(leads) if leads else math.nan,
        "precision": true_warnings / all_warnings if all_warnings else math.nan,
        "false_warnings_per_1k": 1000 * warnings / steps if steps else math.nan,
        "false_actions": actions,
        "prevented": sum(bool(r.prevented) for r in attempted),
        "prevent_attempted": len(attempted),
        "divergent": len([r for r in rows if r.diverged is not None]),
        "divergent_with_precursor": len(divergent),
        "clean_steps": steps,
    }
