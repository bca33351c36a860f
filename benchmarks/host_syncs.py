"""Host synchronisations per training step on CUDA, counted two independent ways.

A host synchronisation is the CPU waiting for the GPU (``.item()``, a copy to pageable memory,
``torch.cuda.synchronize()``, an event wait): it drains the launch queue, so the GPU idles while
Python catches up.  Sentinel's design is zero of them on the step it adds (statistics cross to
the host once per publish through a pinned, event-checked copy), so the count is the figure to
check on a GPU, beside the step-time ratio.

* ``sync_debug``: warnings from ``torch.cuda.set_sync_debug_mode("warn")``, which PyTorch raises
  at each synchronising call it makes itself (``.item()``, ``.cpu()``, ``nonzero``...).
* the profiler (``torch.profiler``, CPU and CUDA activities): CUDA runtime calls that block the
  host, ``cudaStreamSynchronize``, ``cudaDeviceSynchronize`` and ``cudaEventSynchronize``, and the
  device-to-host copies by destination (``Pageable`` ones are synchronous, ``Pinned`` ones need
  not be).  It also sees synchronisations made outside PyTorch's own sync points.

Used by ``benchmarks/overhead.py --syncs N``; imports nothing from sentinel.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch

BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def count_host_syncs(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Per-step counts over ``steps`` calls of ``step`` (already warmed up), each way; a way that
    fails leaves its keys out and says why under ``<way>_error``."""
    out: dict[str, float | str] = {}
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["sync_debug"] = sum("synchroniz" in str(w.message) for w in caught) / steps
    except Exception as exc:  # a benchmark reports what it could not measure, and goes on
        out["sync_debug_error"] = repr(exc)
    torch.cuda.synchronize()
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
        names = Counter(e.name for e in prof.events())
        for call in BLOCKING_CALLS:
            out[call] = names[call] / steps
        out["blocking_calls"] = sum(names[c] for c in BLOCKING_CALLS) / steps
        out["d2h_pageable"] = sum(n for k, n in names.items() if "DtoH" in k and "Pageable" in k) / steps
        out["d2h_pinned"] = sum(n for k, n in names.items() if "DtoH" in k and "Pinned" in k) / steps
    except Exception as exc:
        out["profiler_error"] = repr(exc)
    torch.cuda.synchronize()
    return out  # type: ignore[return-value]


def format_counts(name: str, counts: dict[str, float]) -> str:
    """One line: ``syncs <name>: key=value ...`` (values per step)."""
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in counts.items()]
    return f"syncs {name}: " + " ".join(parts)
