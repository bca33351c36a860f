"""Automatic recovery from a bad-batch region: clean run, bad region without sentinel, bad region with sentinel.

The tiny GPT (2 blocks, d=64, context 64, batch 16, AdamW, LR 3e-3) trains on the standard
library's source.  Batches [start, start+length) are corrupted (``--kind random``: uniform
random bytes; ``constant``: one byte repeated).  With sentinel, a real ``sentinel-agent``
process watches the run; its policy answers a critical loss spike with rollback(steps_back,
skip), and the trainer restores its newest good checkpoint (torch.distributed.checkpoint,
in a temporary directory) and skips the region's batches.  Every run stops when its model
holds the same number of updates, start + length + after (``sn.step``: a rollback winds it
back), and the validation loss on fixed held-out batches is measured there: the recovered
run replaces the skipped batches with the next ones in the stream, as the PaLM recipe does.
Seed-to-seed noise is the spread of the clean run across seeds.

Prints the three losses per seed, the noise, the fraction of the gap the recovered run
closes, and what the agent did; the last line is ``gap_closed=<fraction>``.

    python benchmarks/recovery.py [--seeds 0,1] [--kind random] [--start 150] [--length 20] [--after 150]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sentinel  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402
from examples.tiny_gpt import GPT, BadRegion, GPTConfig, Windows, stdlib_corpus  # noqa: E402

CFG = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
BATCH = 16


def train(seed: int, args: argparse.Namespace, bad: bool, agent: AgentProcess | None, ckpt: str | None) -> dict:
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    tokens = stdlib_corpus()
    n_batches = args.start + args.length + args.after
    spare = args.skip + args.steps_back + 20  # batches for the updates a rollback takes back
    data: torch.utils.data.Dataset = Windows(tokens, CFG.block_size, (n_batches + spare) * BATCH, seed=seed)
    if bad:
        data = BadRegion(data, args.start * BATCH, (args.start + args.length) * BATCH, args.kind)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    held_out = [Windows(tokens, CFG.block_size, 256, seed=99_999)[i] for i in range(256)]
    xv, yv = torch.stack([x for x, _ in held_out]), torch.stack([y for _, y in held_out])

    config: dict = {"run": f"recovery-{seed}", "log_level": "warning", "stats": {"enabled": agent is not None}}
    if agent is not None:
        config |= {
            "publish": {"endpoint": agent.stats_endpoint},
            "control": {"endpoint": agent.commands_endpoint},
            "checkpoint": {"dir": ckpt, "every": 20, "good_after": 10, "keep": 3},
        }
    else:
        config |= {"publish": {"enabled": False}, "control": {"enabled": False}}
    sn = sentinel.attach(model, opt, config=config, lr_scheduler=schedule)
    trained = 0
    for x, y in sn.batches(loader):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        sn.observe(loss=loss)
        trained += 1
        if sn.step >= n_batches:
            break
    sn.close()
    with torch.no_grad():
        val = model(xv, yv)[1].item()
    return {"val_loss": val if math.isfinite(val) else float("inf"), "trained_steps": trained, "final_step": sn.step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--kind", choices=("random", "constant"), default="random")
    parser.add_argument("--start", type=int, default=150, help="first bad batch")
    parser.add_argument("--length", type=int, default=20, help="bad batches")
    parser.add_argument("--after", type=int, default=150, help="batches after the region before measuring")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps-back", type=int, default=10)
    parser.add_argument("--skip", type=int, default=40)
    parser.add_argument("--no-sentinel", action="store_true", help="only the clean and unrecovered runs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    agent_config = {
        "policy": {
            "rules": [
                {
                    "detector": "nonfinite",
                    "severity": "critical",
                    "action": "rollback",
                    "args": {"steps_back": args.steps_back, "skip": args.skip},
                },
                {
                    "detector": "loss_spike",
                    "severity": "critical",
                    "action": "rollback",
                    "args": {"steps_back": args.steps_back, "skip": args.skip},
                },
                {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
            ]
        }
    }
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        clean = train(seed, args, bad=False, agent=None, ckpt=None)
        broken = train(seed, args, bad=True, agent=None, ckpt=None)
        row = {"seed": seed, "clean": clean["val_loss"], "bad": broken["val_loss"]}
        if not args.no_sentinel:
            with tempfile.TemporaryDirectory() as tmp, AgentProcess(Path(tmp) / "agent", config=agent_config) as agent:
                recovered = train(seed, args, bad=True, agent=agent, ckpt=str(Path(tmp) / "ckpt"))
                events = [json.loads(line) for line in Path(agent.events_path).read_text().splitlines() if line]
            row["recovered"] = recovered["val_loss"]
            row["trained_steps"] = recovered["trained_steps"]
            row["actions"] = [(e["action"], e.get("step")) for e in events if e.get("type") == "decision"]
            row["acks"] = [(e.get("status"), e.get("step")) for e in events if e.get("type") == "ack"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(
        f"tiny GPT 2x64, LR {args.lr:g}, {args.kind} region of {args.length} batches at {args.start}; "
        f"validation loss {args.after} batches after the region"
    )
    print(f"{'seed':>4} {'clean':>8} {'bad':>8} {'recovered':>10}  agent decisions")
    for r in rows:
        rec = f"{r['recovered']:>10.4f}" if "recovered" in r else f"{'-':>10}"
        print(f"{r['seed']:>4} {r['clean']:>8.4f} {r['bad']:>8.4f} {rec}  {r.get('actions', '')}")
    cleans = [r["clean"] for r in rows]
    noise = statistics.pstdev(cleans) if len(cleans) > 1 else float("nan")
    gap = statistics.mean(r["bad"] - r["clean"] for r in rows)
    print(f"seed-to-seed noise (std of clean): {noise:.4f}; mean gap opened by the region: {gap:.4f}")
    if not args.no_sentinel:
        closed = statistics.mean((r["bad"] - r["recovered"]) / (r["bad"] - r["clean"]) for r in rows)
        print(f"gap_closed={closed:.3f}")


if __name__ == "__main__":
    main()
