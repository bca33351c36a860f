"""Optimizer-step time and peak memory: plain AdamW (foreach) against AdamW with sentinel's transforms.

The model is the tiny GPT's architecture at d=768, 8 blocks (≈57M parameters) on CPU.  Only
``optimizer.step()`` is timed, on fixed gradients restored before each step.  Each variant
runs in its own process so its peak resident memory is its own; variants alternate in
rounds.  Variants:
  plain   AdamW(foreach=True), sentinel not attached
  clamp     sentinel with the update-ratio clamp only (statistics off)
  no_wesar  guard + ε auto-tuning + clamp (statistics off)
  all       guard + WeSaR + ε auto-tuning + clamp (statistics off)
Prints median step time, its ratio to plain and peak RSS; the last line is
``optim_step_ratio=<all/plain>``.

    python benchmarks/optim_step.py [--rounds 2] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": None,
    "clamp": {"clamp": {"enabled": True, "default": 0.05}},
    "no_wesar": {
        "guard": {"enabled": True},
        "eps": {"enabled": True},
        "clamp": {"enabled": True, "default": 0.05},
    },
    "all": {
        "guard": {"enabled": True},
        "wesar": {"enabled": True},
        "eps": {"enabled": True},
        "clamp": {"enabled": True, "default": 0.05},
    },
}


def child(variant: str, steps: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    import sentinel
    from examples.tiny_gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    sn = None
    if VARIANTS[variant] is not None:
        sn = sentinel.attach(
            model,
            opt,
            publish={"enabled": False},
            stats={"enabled": False},
            optim=VARIANTS[variant],
            log_level="warning",
        )
    times = []
    for _ in range(steps + 1):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times[1:], "peak_bytes": peak, "params": n_params}))
    if sn is not None:
        sn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.threads)
        return

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, int] = {v: 0 for v in VARIANTS}
    n_params = 0
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for v in order:
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--threads", str(args.threads)]
            out = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
            times[v] += out["times"]
            peaks[v] = max(peaks[v], out["peak_bytes"])
            n_params = out["params"]
            print(f"round {r + 1}/{args.rounds}: {v} done", file=sys.stderr, flush=True)

    plain = statistics.median(times["plain"])
    print(
        f"model: {n_params / 1e6:.1f}M parameters, AdamW(foreach, lr 1e-4, betas 0.9/0.95, wd 0.1), {args.threads} threads, CPU"
    )
    print(f"\n{'variant':<9} {'median step':>12} {'ratio':>7} {'peak RSS':>10}")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"{v:<9} {med * 1e3:>9.1f} ms {med / plain:>7.3f} {peaks[v] / 2**20:>7.0f} MiB")
    print(f"\nclamp_memory_extra_mib={(peaks['clamp'] - peaks['plain']) / 2**20:.0f}")
    print(f"optim_step_ratio={statistics.median(times['all']) / plain:.3f}")


if __name__ == "__main__":
    main()
