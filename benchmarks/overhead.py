"""Step-time overhead of sentinel on the tiny GPT, against the same training without it.

Three variants train identical models on identical data, interleaved in rounds so that
machine noise hits all of them alike:
  bare      the plain loop;
  sentinel  sentinel attached, statistics every step, publishing to a live agent process;
  callback  what callback-based monitors do today: copy the parameters before the step, then
            per parameter grad/param/update ``.norm().item()`` after it (one host sync each).
Prints the median step time of each and its ratio to bare; the last line is
``overhead_ratio=<sentinel/bare>``.

    python benchmarks/overhead.py [--rounds 6] [--steps 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentinel  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402
from examples.tiny_gpt import GPTConfig, TrainConfig, make_run  # noqa: E402


class CallbackMonitor:
    """Per-parameter norms with one .item() each, the way callback monitors log them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.before: list[torch.Tensor] = []
        self.logged: dict[str, float] = {}

    def before_step(self) -> None:
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def after_step(self) -> None:
        for (name, p), b in zip(self.model.named_parameters(), self.before):
            self.logged[name + ".grad"] = p.grad.norm().item()
            self.logged[name + ".param"] = p.detach().norm().item()
            self.logged[name + ".update_ratio"] = (p.detach() - b).norm().item() / max(b.norm().item(), 1e-30)


class Variant:
    def __init__(self, name: str, tc: TrainConfig, endpoint: str):
        self.name = name
        self.model, self.optimizer, self.schedule, loader = make_run(tc, GPTConfig())
        self.batches = iter(loader)
        self.times: list[float] = []
        self.sn = None
        self.cb = None
        if name == "sentinel":
            self.sn = sentinel.attach(self.model, self.optimizer, run="overhead", publish={"endpoint": endpoint})
        elif name == "callback":
            self.cb = CallbackMonitor(self.model)

    def run(self, steps: int, warmup: int = 2) -> None:
        for i in range(steps):
            start = time.perf_counter()
            x, y = next(self.batches)
            _, loss = self.model(x, y)
            loss.backward()
            if self.cb:
                self.cb.before_step()
            self.optimizer.step()
            if self.cb:
                self.cb.after_step()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            if self.sn:
                self.sn.observe(loss=loss)
            if i >= warmup:
                self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tc = TrainConfig(steps=args.rounds * args.steps + 10, batch_size=args.batch_size)
    gpt = GPTConfig()
    n_params = sum(p.numel() for p in make_run(tc, gpt)[0].parameters())
    print(
        f"tiny GPT: {gpt.n_layer} layers, d={gpt.n_embd}, {gpt.n_head} heads, context {gpt.block_size}, "
        f"batch {tc.batch_size}, {n_params / 1e6:.2f}M parameters, AdamW, {args.threads} threads"
    )
    with AgentProcess() as agent:
        variants = [Variant(name, tc, agent.stats_endpoint) for name in ("bare", "sentinel", "callback")]
        for r in range(args.rounds):
            for v in variants[r % 3 :] + variants[: r % 3]:
                v.run(args.steps)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        sn = variants[1].sn
        counters = sn.counters
        sn.close()
        received = agent.metrics_text()

    bare = statistics.median(variants[0].times)
    print(f"\n{'variant':<10} {'median step':>12} {'ratio':>7}")
    ratios = {}
    for v in variants:
        med = statistics.median(v.times)
        ratios[v.name] = med / bare
        print(f"{v.name:<10} {med * 1e3:>9.1f} ms {ratios[v.name]:>7.3f}")
    print(
        f"\nsentinel published {counters['sent']} messages, dropped {counters['dropped']}, errors {counters['errors']}"
    )
    assert "sentinel_loss" in received, "the agent never exported the run's loss"
    print(f"callback_ratio={ratios['callback']:.3f}")
    print(f"overhead_ratio={ratios['sentinel']:.3f}")


if __name__ == "__main__":
    main()
