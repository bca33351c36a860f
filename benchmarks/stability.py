"""Learning-rate sweep on the tiny GPT: baseline, WeSaR, update-ratio clamp, and all transforms together.

For each configuration and peak LR (cosine schedule with warm-up, AdamW), trains a small
tiny-GPT (2 blocks, d=64, context 64, batch 16) and measures the final validation loss on
fixed held-out batches.  Summarises each row by LR sensitivity as defined by Wortsman et al.
(papers/003, §2.2): E_η[min(ℓ(η), ℓ0) − ℓ*] over the LR grid, with ℓ* the best loss in the
row and ℓ0 the loss at initialisation.  A diverged run (non-finite loss) counts as ℓ0.
Prints the table as measured.

    python benchmarks/stability.py [--steps 300] [--lrs 1e-3,3e-3,1e-2,3e-2,1e-1] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "baseline": None,
    "wesar": {"wesar": {"enabled": True, "init": "wesar"}},
    "clamp": {"clamp": {"enabled": True, "default": 0.05}},
    "all": {
        "guard": {"enabled": True},
        "wesar": {"enabled": True, "init": "wesar"},
        "eps": {"enabled": True},
        "clamp": {"enabled": True, "default": 0.05},
    },
}


def run(config: str, lr: float, steps: int, seed: int) -> tuple[float, float]:
    """(validation loss at init, final validation loss) for one cell."""
    import torch

    sys.path.insert(0, str(ROOT))
    import sentinel
    from examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    tokens = stdlib_corpus()
    train = torch.utils.data.DataLoader(Windows(tokens, cfg.block_size, steps * 16, seed=seed), batch_size=16)
    held_out = [Windows(tokens, cfg.block_size, 128, seed=10_000 + seed)[i] for i in range(128)]
    xv = torch.stack([x for x, _ in held_out])
    yv = torch.stack([y for _, y in held_out])

    def validate() -> float:
        with torch.no_grad():
            loss = model(xv, yv)[1].item()
        return loss if math.isfinite(loss) else float("inf")

    initial = validate()
    sn = sentinel.attach(
        model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=CONFIGS[config] or {}, log_level="error"
    )
    for x, y in sn.batches(train):
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        sn.observe(loss=loss)
    sn.close()
    return initial, validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    cells = [(c, lr) for c in CONFIGS for lr in lrs]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {cell: pool.submit(run, *cell, args.steps, args.seed) for cell in cells}
        results = {}
        for cell, fut in futures.items():
            results[cell] = fut.result()
            print(f"{cell[0]:>8} lr={cell[1]:g}: {results[cell][1]:.4f}", file=sys.stderr, flush=True)

    print(f"tiny GPT 2x64, {args.steps} steps, AdamW(0.9, 0.95), wd 0.1, cosine with warm-up; final validation loss")
    print(f"{'config':<9}" + "".join(f"{lr:>9g}" for lr in lrs) + f"{'LR sens.':>10}")
    for c in CONFIGS:
        losses = [results[(c, lr)][1] for lr in lrs]
        l0 = statistics.mean(results[(c, lr)][0] for lr in lrs)
        best = min(losses)
        sensitivity = statistics.mean(min(x, l0) - best for x in losses)
        cells_text = "".join(f"{x:>9.3f}" if math.isfinite(x) else f"{'diverged':>9}" for x in losses)
        print(f"{c:<9}{cells_text}{sensitivity:>10.3f}")


if __name__ == "__main__":
    main()
