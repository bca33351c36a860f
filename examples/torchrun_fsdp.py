"""FSDP2 (``fully_shard``) on the tiny GPT, with sentinel attached on every rank.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp.py --steps 100
    torchrun --nproc-per-node 2 examples/torchrun_fsdp.py --steps 100 --checkpoint-dir /tmp/ckpt  # rerun: resumes

gloo on CPU, nccl on GPU (one GPU per process).  Parameters, gradients and Adam's state are
DTensors sharded on dim 0; sentinel sums each tensor's statistics over the shards with one
all-reduce per statistics step, so the update ratios rank 0 publishes are those of the whole
tensors (docs/distributed.md).  Checkpoints and rollbacks go through torch.distributed.checkpoint.
The lines that involve sentinel are marked `# sentinel`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from sentinel.examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus
from torch.distributed.fsdp import fully_shard

import sentinel


def sharded_gpt(cfg: GPTConfig, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    """The tiny GPT, every block and then the root sharded with FSDP2 (same initial weights on every rank)."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device=device, dtype=dtype)
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train (in all, when resumed)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size, split over the ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--stats-every", type=int, default=None, help="statistics (and their all-reduce) every N steps")
    parser.add_argument("--checkpoint-dir", default=None, help="shared folder for DCP checkpoints; resumes from it")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--config", default=None, help="sentinel YAML config; the options above override it")
    parser.add_argument("--run", default="fsdp-tiny-gpt", help="run name (the agent's `run` label)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, device: torch.device) -> dict:
    """Train to ``args.steps`` in the initialised process group (resuming from a checkpoint if there is one)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, block_size=args.block_size)
    model = sharded_gpt(cfg, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = Windows(stdlib_corpus(), cfg.block_size, length=args.steps * args.batch_size)
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size // world, sampler=sampler)

    overrides: dict = {"run": args.run}
    if args.stats_every is not None:
        overrides["stats__every"] = args.stats_every
    if args.checkpoint_dir is not None:
        overrides["checkpoint"] = {"dir": args.checkpoint_dir, "every": args.checkpoint_every, "good_after": 1}
    sn = sentinel.attach(model, optimizer, args.config, **overrides)  # sentinel: on every rank
    resumed = sn.checkpoints.resume() if sn.checkpoints is not None else None  # sentinel: DCP, sharded
    losses = []
    for x, y in sn.batches(loader):  # sentinel: tracks the data position, applies skips and rollbacks
        _, loss = model(x.to(device), y.to(device))
        loss.backward()
        optimizer.step()  # sentinel's hooks measure the shards, then all-reduce one packed vector
        optimizer.zero_grad(set_to_none=True)
        sn.observe(loss=loss)  # sentinel: this rank's loss; publish, commands, checkpoints
        losses.append(loss.item())
    sn.close()  # sentinel
    return {"resumed": resumed, "step": sn.step, "losses": losses}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} ranks")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    result = train(args, device)
    if dist.get_rank() == 0:
        if result["resumed"] is not None:
            print(f"resumed from step {result['resumed']}")
        if result["losses"]:
            print(f"step {result['step']}: loss {result['losses'][-1]:.4f} (rank 0's batches)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
