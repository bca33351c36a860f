"""The tiny GPT as a LightningModule, trained by Lightning with sentinel attached as a callback.

The model and data are those of examples/tiny_gpt.py (bytes of the Python standard library).
The lines that involve sentinel are marked `# sentinel`.  Start an agent (`sentinel-agent run`)
to see statistics and commands; without one, training runs the same.

    python examples/lightning_module.py --steps 200 --ckpt /tmp/pl-ckpt

docs/integrations.md says what is supported and how rollback works.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from sentinel.examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus

from sentinel.integrations.lightning import SentinelCallback, fit  # sentinel


class TinyGPTModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, steps: int = 200):
        super().__init__()
        self.lr, self.steps = lr, steps
        self.gpt = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.gpt(x, y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument(
        "--ckpt", default="pl-ckpt", help="folder of sentinel's Lightning checkpoints (rollback targets)"
    )
    parser.add_argument("--config", default=None, help="sentinel YAML (default: built-in settings below)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    data = Windows(stdlib_corpus(), block_size=64, length=100_000)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    sentinel_config = args.config or {  # sentinel
        "run": "lightning-example",
        "checkpoint": {"dir": args.ckpt, "every": 50, "good_after": 50},  # step-N.ckpt, good after 50 clean steps
        "optim": {"guard": {"enabled": True}},  # skip non-finite and outlier updates in-step
    }
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="auto",
        callbacks=[SentinelCallback(sentinel_config)],  # sentinel
        logger=False,
        enable_checkpointing=False,
    )
    fit(trainer, TinyGPTModule(steps=args.steps), loader)  # sentinel: trainer.fit that follows rollbacks
    print(f"trained {trainer.global_step} steps")


if __name__ == "__main__":
    main()
