"""A small trainer process for the integration tests: an MLP trained with sentinel attached.

Writes a JSON report (losses, wall time of every step, publisher counters) to --out.
Usage: python tests/trainer_proc.py --endpoint tcp://127.0.0.1:PORT --run NAME --steps N --out FILE
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sentinel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="keep training until this much time passed")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(
        torch.nn.Linear(64, w), torch.nn.GELU(), torch.nn.Linear(w, w), torch.nn.GELU(), torch.nn.Linear(w, 64)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses, times = [], []
    start = time.time()
    with sentinel.attach(model, optimizer, run=args.run, publish={"endpoint": args.endpoint}) as sn:
        step = 0
        while step < args.steps or time.time() - start < args.min_seconds:
            x = torch.randn(128, 64, generator=gen)
            loss = (model(x) - x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sn.observe(loss=loss)
            losses.append(loss.item())
            times.append(time.time())
            step += 1
        counters = sn.counters
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "times": times, "counters": counters}, f)


if __name__ == "__main__":
    main()
