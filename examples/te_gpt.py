"""A small GPT built from Transformer Engine layers, trained with sentinel attached (needs CUDA and TE).

    python examples/te_gpt.py --steps 200 [--fp8] [--qk-norm-type RMSNorm]

The lines that involve sentinel are marked `# sentinel`.  Statistics come from the master
weights the optimizer holds, also under FP8; sentinel re-casts TE's cached FP8 weights after it
writes weights itself (docs/te.md).  TE's attention has QK-norm (`qk_norm_type`) but no
soft-capping argument: soft-capping is not available for TE attention.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from sentinel.examples.tiny_gpt import Windows, stdlib_corpus

import sentinel


class TEGPT(torch.nn.Module):
    def __init__(
        self, d: int = 256, layers: int = 4, heads: int = 4, block: int = 128, qk_norm_type: str | None = None
    ):
        super().__init__()
        import transformer_engine.pytorch as te

        self.wte, self.wpe = torch.nn.Embedding(256, d), torch.nn.Embedding(block, d)
        extra = {"qk_norm_type": qk_norm_type} if qk_norm_type else {}
        self.h = torch.nn.ModuleList(
            te.TransformerLayer(d, 4 * d, heads, self_attn_mask_type="causal", layer_number=i + 1, **extra)
            for i in range(layers)
        )
        self.ln_f = te.LayerNorm(d)
        self.lm_head = te.Linear(d, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = (self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))).transpose(0, 1)
        for layer in self.h:  # TE layers take (sequence, batch, hidden)
            x = layer(x)
        return self.lm_head(self.ln_f(x)).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fp8", action="store_true", help="train under TE's fp8_autocast (Hopper or newer)")
    parser.add_argument("--qk-norm-type", default=None, help="TE's QK-norm, e.g. RMSNorm")
    parser.add_argument("--config", default=None, help="sentinel YAML config")
    args = parser.parse_args()
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    model = TEGPT(qk_norm_type=args.qk_norm_type).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.utils.data.DataLoader(Windows(stdlib_corpus(), 128, length=args.steps * 16), batch_size=16)
    fp8 = te.fp8_autocast(enabled=True) if args.fp8 else contextlib.nullcontext()
    with sentinel.attach(model, opt, config=args.config) as sn:  # sentinel
        for x, y in sn.batches(data):  # sentinel
            x, y = x.cuda(), y.cuda()
            with fp8:
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) + sentinel.z_loss(logits)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sn.observe(loss=loss)  # sentinel
    print(f"final loss {loss.item():.4f} after {sn.step} steps")


if __name__ == "__main__":
    main()
