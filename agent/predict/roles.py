"""Which rows of a message a mechanism applies to, from the roles the trainer sends with the layout.

WeSaR's fragile matrices and the ε-stall are about weight matrices and embeddings, not about
normalisation gains or biases (a zero-initialised bias has an enormous update ratio; a bias with
no gradient by construction has √v̂ = 0).  The trainer sends each parameter's role with the layout
(docs/protocol.md: "norm", "bias", "vector" for 1-D tensors; a matrix role or "matrix" otherwise),
found from the model's structure, so this holds for any naming style.  From a trainer that sends
no roles, a row is a gain or a bias when its name says so (``predict.update_ratio.exclude``).
"""

from __future__ import annotations

import numpy as np

from sentinel_contract.protocol import VECTOR_ROLES, Layout, StatsMessage

FALLBACK_EXCLUDE = ("bias", "norm", "ln_", "ln1", "ln2", "ln_f", "layernorm", "rmsnorm")

_cache: dict[tuple[Layout, tuple[str, ...]], np.ndarray] = {}


def matrix_rows(layout: Layout, exclude: tuple[str, ...] = FALLBACK_EXCLUDE) -> np.ndarray:
    """Boolean mask of the rows that are weight matrices or embeddings (read-only, cached per layout)."""
    key = (layout, exclude)
    mask = _cache.get(key)
    if mask is None:
        roles = getattr(layout, "roles", ()) or ()
        if roles:
            mask = np.array([bool(r) and r not in VECTOR_ROLES for r in roles], dtype=bool)
        else:
            low = [t.lower() for t in layout.tensors]
            mask = np.array([not any(p in t for p in exclude) for t in low], dtype=bool)
        mask.flags.writeable = False
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = mask
    return mask


def trained_rows(msg: StatsMessage, exclude: tuple[str, ...] = FALLBACK_EXCLUDE) -> np.ndarray:
    """Matrix rows whose gradient this step is not zero (a tensor without gradient is not being trained)."""
    mask = matrix_rows(msg.layout, exclude)
    stats = msg.layout.stats
    for name in ("grad_l2", "grad_rms"):
        if name in stats:
            return mask & (msg.matrix[:, stats.index(name)] > 0)
    return mask
