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
from sentinel import stabilise

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
    init: str = "gpt2"  # or "small_scaled": N(0, 2/(5d)), W_o and W_down / sqrt(2N) (Takase's Vanilla)
    scaled_embed: bool = False  # stabilisers: sentinel/stabilise.py says which paper each comes from
    embed_ln: bool = False
    qk_norm: bool = False
    softcap: float | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.qk_norm, self.softcap = cfg.n_head, cfg.qk_norm, cfg.softcap
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm or self.softcap:
            y = stabilise.attention(q, k, v, qk_normalise=self.qk_norm, cap=self.softcap)
        else:
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
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init (std 0.02) or Takase's Vanilla (std sqrt(2/(5d))); residual projections / sqrt(2N)."""
        cfg = self.cfg
        base = 0.02 if cfg.init == "gpt2" else math.sqrt(2 / (5 * cfg.n_embd))
        for name, p in self.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, base / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else base)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)  # LayerNorm gains

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        tok = self.wte(idx)
        if self.cfg.scaled_embed:
            tok = tok * math.sqrt(self.cfg.n_embd)
        elif self.cfg.embed_ln:
            tok = F.layer_norm(tok, tok.shape[-1:])
        x = tok + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def model() -> GPT:
    """The demo model with default sizes: `sentinel audit examples/tiny_gpt.py:model`."""
    return GPT(GPTConfig())


def takase_1p7b(method: str = "vanilla") -> GPT:
    """Takase et al.'s 1.7B configuration (papers/000 Table 4: N=24, d=2304, d_ffn=4d, 24 heads,
    GPT-2 vocabulary) with method 'vanilla', 'scaled_embed' or 'embed_ln' (§5)."""
    cfg = GPTConfig(vocab_size=50257, block_size=2048, n_layer=24, n_head=24, n_embd=2304, init="small_scaled")
    cfg.scaled_embed, cfg.embed_ln = method == "scaled_embed", method == "embed_ln"
    with torch.device("meta"):  # one initialisation pass, not nn.Linear's and then ours
        gpt = GPT(cfg)
    if torch.get_default_device().type != "meta":  # `sentinel audit` without --no-meta wants shapes only
        gpt.to_empty(device=torch.get_default_device())
        gpt.init_weights()
    return gpt


def takase_vanilla() -> GPT:
    """`sentinel audit sentinel.examples.tiny_gpt:takase_vanilla --no-meta` (and the two below)."""
    return takase_1p7b("vanilla")


def takase_scaled_embed() -> GPT:
    return takase_1p7b("scaled_embed")


def takase_embed_ln() -> GPT:
    return takase_1p7b("embed_ln")


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
