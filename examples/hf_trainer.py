"""A tiny GPT-2 trained with the Hugging Face Trainer, with sentinel attached as a callback.

The model is built from a config in code (no download) and trained on the bytes of the Python
standard library.  The lines that involve sentinel are marked `# sentinel`.  Start an agent
(`sentinel-agent run`) to see statistics and commands; without one, training runs the same.

    python examples/hf_trainer.py --steps 200 --out /tmp/hf-run
    python examples/hf_trainer.py --steps 200 --out /tmp/hf-run --resume   # after a restart

docs/integrations.md says what is supported and how rollback works.
"""

from __future__ import annotations

import argparse
import logging

import torch
from sentinel.examples.tiny_gpt import Windows, stdlib_corpus
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from sentinel.integrations.hf import SentinelCallback, train  # sentinel


class CausalLMData(torch.utils.data.Dataset):
    """Fixed random windows of the corpus as {input_ids, labels}; GPT-2 shifts the labels itself."""

    def __init__(self, block_size: int, length: int):
        self.windows = Windows(stdlib_corpus(), block_size, length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, _ = self.windows[i]
        return {"input_ids": x, "labels": x}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--out", default="hf-run", help="the Trainer's output_dir: checkpoints land here")
    parser.add_argument("--config", default=None, help="sentinel YAML (default: built-in settings below)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the newest checkpoint-N in --out (a rollback renames the ones it abandons)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        logging_steps=10,
        save_steps=50,  # the rollback targets: sentinel judges each checkpoint-N
        save_total_limit=None,  # rotation could delete a good checkpoint and keep unproven ones
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    sentinel_config = args.config or {  # sentinel
        "run": "hf-example",
        "checkpoint": {"good_after": 50},  # a checkpoint is good after 50 clean steps
        "optim": {"guard": {"enabled": True}},  # skip non-finite and outlier updates in-step
    }
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=CausalLMData(block_size=64, length=100_000),
        callbacks=[SentinelCallback(sentinel_config)],  # sentinel
    )
    output = train(trainer, resume_from_checkpoint=True if args.resume else None)  # sentinel: follows rollbacks
    print(f"trained {output.global_step} steps, train loss {output.training_loss:.3f}")


if __name__ == "__main__":
    main()
