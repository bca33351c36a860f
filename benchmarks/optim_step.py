"""Optimizer-step time and peak memory: plain AdamW (foreach) against AdamW with sentinel's transforms.

The model is the tiny GPT's architecture at d=768, 8 blocks (≈57M parameters) on CPU.  Only
``optimizer.step()`` is timed, on fixed gradients restored before each step.  Each variant
runs in its own process so its peak resident memory is its own; variants alternate in
rounds.  Variants:
  plain   AdamW(foreach=True), sentinel not attached
  clamp     sentinel with the update-ratio clamp only (statistics off)
  no_wesar  guard + ε auto-tuning + clamp (statistics off)
  all       guard + WeSaR + ε auto-tuning + clamp (statistics off), around the optimizer's step
  fused     the same four, with sentinel making the update in one fused Adam pass (optim.fused: auto)
  plain_fused  AdamW(fused=True), sentinel not attached: torch's own one-pass step, a second baseline
  all_stats, fused_stats  all and fused with statistics on every step (the default cadence is every
                step too): what the four cost where a user runs them, statistics included
Prints median step time, its ratio to plain and peak RSS; the last line is
``optim_step_ratio=<fused/plain>``.

``--in-process`` is for a busy machine: every variant lives in one process on its own copy of
the model, and the variants step back to back on the same gradients, in alternating order,
so they share the machine's load.  It reports wall and process-CPU time per step, the median
of the per-round ratios to plain (paired, so load that changes between rounds cancels), and
no peak memory.

``--train-step`` times the whole training step (forward + backward + step, ``--tokens`` per
step, default 16384) for plain AdamW, all four around the step and all four fused, interleaved.

    python benchmarks/optim_step.py [--rounds 2] [--steps 6] [--threads 2] [--in-process | --train-step]
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
    "fused": {
        "guard": {"enabled": True},
        "wesar": {"enabled": True},
        "eps": {"enabled": True},
        "clamp": {"enabled": True, "default": 0.05},
        "fused": "auto",
    },
    "plain_fused": None,
}
VARIANTS["all_stats"], VARIANTS["fused_stats"] = VARIANTS["all"], VARIANTS["fused"]
STATS_ON = ("all_stats", "fused_stats")


def child(variant: str, steps: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.tiny_gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=128))
    opt, sn = _optimizer(torch, model, variant)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
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


def _optimizer(torch, model, variant: str):
    """AdamW over ``model``, with sentinel attached with ``variant``'s transforms (none for plain)."""
    import sentinel

    kind = {"fused": True} if variant == "plain_fused" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kind)
    if VARIANTS[variant] is None:
        return opt, None
    stats = {"enabled": True, "every": 1} if variant in STATS_ON else {"enabled": False}
    sn = sentinel.attach(
        model, opt, publish={"enabled": False}, control={"enabled": False}, stats=stats, optim=VARIANTS[variant],
        log_level="warning",
    )  # fmt: skip
    if variant.startswith("fused") and sn.chain.fused is None:
        raise SystemExit(f"variant {variant}: the fused step did not run (see the WARNING above)")
    return opt, sn


def _model_and_optimizer(torch, variant: str, base):
    import copy

    model = copy.deepcopy(base)
    return model, *_optimizer(torch, model, variant)


def in_process(steps: int, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.tiny_gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=128))
    runs = {v: _model_and_optimizer(torch, v, base) for v in VARIANTS}
    grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(steps + 1):
        for v in list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS)):
            model, opt, _ = runs[v]
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            c, t = time.process_time(), time.perf_counter()
            opt.step()
            if r:
                wall[v].append(time.perf_counter() - t)
                cpu[v].append(time.process_time() - c)
    print(f"in one process, {steps} interleaved steps, {threads} threads, CPU")
    print(f"\n{'variant':<12} {'wall med':>9} {'paired':>7} {'min-max':>13} {'CPU med':>9} {'paired':>7}")
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(wall[v], wall["plain"])]
        pc = statistics.median(a / b for a, b in zip(cpu[v], cpu["plain"]))
        print(
            f"{v:<12} {statistics.median(wall[v]) * 1e3:>6.0f} ms {statistics.median(ratios):>7.3f} "
            f"{min(ratios):>6.3f}-{max(ratios):<6.3f} {statistics.median(cpu[v]) * 1e3:>6.0f} ms {pc:>7.3f}"
        )
    print(f"\noptim_step_ratio={statistics.median(a / b for a, b in zip(wall['fused'], wall['plain'])):.3f}")
    for _, _, sn in runs.values():
        if sn is not None:
            sn.close()


def train_step(steps: int, threads: int, tokens: int) -> None:
    """Forward + backward + step at ``tokens`` tokens per step: plain, all four around the step, all four fused."""
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.tiny_gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=128)
    base = GPT(cfg)
    variants = ("plain", "all", "fused")
    runs = {v: _model_and_optimizer(torch, v, base) for v in variants}
    gen = torch.Generator().manual_seed(1)
    batch = max(1, tokens // cfg.block_size)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(steps + 1):
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=gen)
        for v in variants if r % 2 == 0 else tuple(reversed(variants)):
            model, opt, _ = runs[v]
            t = time.perf_counter()
            _, loss = model(x, x.roll(1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if r:
                wall[v].append(time.perf_counter() - t)
    print(f"training step: {batch * cfg.block_size} tokens, {steps} interleaved steps, {threads} threads, CPU")
    for v in variants:
        ratios = [a / b for a, b in zip(wall[v], wall["plain"])]
        print(
            f"{v:<6} {statistics.median(wall[v]) * 1e3:>8.0f} ms  paired {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f})"
        )
    for _, _, sn in runs.values():
        if sn is not None:
            sn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-process", action="store_true", help="all variants in one process, steps interleaved")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument(
        "--train-step", action="store_true", help="time forward + backward + step (plain, all four, fused)"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per training step (--train-step)")
    args = parser.parse_args()
    if args.train_step:
        train_step(args.steps * args.rounds, args.threads, args.tokens)
        return
    if args.in_process:
        in_process(args.steps * args.rounds, args.threads)
        return
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
    print(f"\n{'variant':<12} {'median step':>12} {'ratio':>7} {'peak RSS':>10}")
    for v in VARIANTS:
        med = statistics.median(times[v])
        print(f"{v:<12} {med * 1e3:>9.1f} ms {med / plain:>7.3f} {peaks[v] / 2**20:>7.0f} MiB")
    print(f"\nclamp_memory_extra_mib={(peaks['clamp'] - peaks['plain']) / 2**20:.0f}")
    print(f"fused_memory_extra_mib={(peaks['fused'] - peaks['plain']) / 2**20:.0f}")
    print(f"optim_step_ratio={statistics.median(times['fused']) / plain:.3f}")


if __name__ == "__main__":
    main()
