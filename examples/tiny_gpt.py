"""A tiny GPT trained on the Python standard library's own source code, with sentinel attached.

Read top to bottom: data, model, training loop.  The five lines that involve sentinel are
marked `# sentinel`.  Run it:  python examples/tiny_gpt.py --steps 200
"""

from __future__ import annotations

import argparse
import functools
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sentinel

# ---------------------------------------------------------------- data: bytes of *.py files


@functools.lru_cache(maxsize=2)
def stdlib_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The first `max_bytes` bytes of the standard library's .py files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class Windows(torch.utils.data.Dataset):
    """Item i is a fixed random window of the corpus: map-style, so any batch can be re-made."""

    def __init__(self, tokens: torch.Tensor, block_size: int, length: int, seed: int = 0):
        self.tokens, self.block_size, self.length, self.seed = tokens, block_size, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(np.random.default_rng([self.seed, i]).integers(0, len(self.tokens) - self.block_size - 1))
        chunk = self.tokens[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class BadRegion(torch.utils.data.Dataset):
    """`data` with items [lo, hi) replaced by garbage (random bytes or one repeated byte): a bad-batch region."""

    def __init__(self, data: torch.utils.data.Dataset, lo: int, hi: int, kind: str = "random"):
        self.data, self.lo, self.hi, self.kind = data, lo, hi, kind

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[i]
        if not self.lo <= i < self.hi:
            return x, y
        if self.kind == "constant":
            chunk = torch.full((len(x) + 1,), ord("A"), dtype=torch.long)
        else:
            chunk = torch.randint(0, 256, (len(x) + 1,), generator=torch.Generator().manual_seed(i))
        return chunk[:-1], chunk[1:]


# ---------------------------------------------------------------- model: GPT-2 shaped


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by 1/sqrt(2N)
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def model() -> GPT:
    """The demo model with default sizes: `sentinel audit examples/tiny_gpt.py:model`."""
    return GPT(GPTConfig())


# ---------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 24
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    seed: int = 0
    threads: int = 2
    bad_batches: tuple[int, int] | None = (
        None  # [first, last) batch replaced by random bytes (sentinel demo --inject-spike)
    )


def make_run(tc: TrainConfig, gpt: GPTConfig | None = None):
    """Model, optimizer, LR schedule and data loader, all seeded: two calls give identical runs."""
    torch.manual_seed(tc.seed)
    model = GPT(gpt or GPTConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / tc.warmup))
    data = Windows(stdlib_corpus(), model.cfg.block_size, length=tc.steps * tc.batch_size, seed=tc.seed)
    if tc.bad_batches:
        data = BadRegion(data, tc.bad_batches[0] * tc.batch_size, tc.bad_batches[1] * tc.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=tc.batch_size, shuffle=False)
    return model, optimizer, schedule, loader


def train(tc: TrainConfig, sentinel_config=None, on_step=None) -> list[float]:
    torch.set_num_threads(tc.threads)
    model, optimizer, schedule, loader = make_run(tc)
    losses = []
    with sentinel.attach(model, optimizer, config=sentinel_config, lr_scheduler=schedule) as sn:  # sentinel
        for x, y in sn.batches(loader):  # sentinel
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            sn.observe(loss=loss)  # sentinel
            losses.append(loss.item())
            if on_step is not None:
                on_step(sn, losses[-1])
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--config", default=None, help="sentinel YAML config (default: built-in defaults)")
    args = parser.parse_args()
    losses = train(TrainConfig(steps=args.steps, lr=args.lr), sentinel_config=args.config)
    print(f"final loss {losses[-1]:.4f} after {len(losses)} steps")
