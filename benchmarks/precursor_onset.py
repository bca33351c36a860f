"""How much lead can any predictor have? The attention-logit precursor against the loss, step by step.

A forecast can only lead the loss by as much as the precursor leads it.  This script trains a zoo
attention scenario (no QK-norm), its QK-norm twin and the twin from another initialisation (for
the noise band of ``benchmarks/zoo/judge.py``) on the same batches, with no sentinel attached, and
prints every ``--every`` steps the largest attention logit (q·k/√d over all heads and positions,
from a forward hook on the fused qkv projection) beside the trailing loss gap to the twin.  Its
last line is

    logit_onset=<step> logit_watched=<step> diverged=<step> lead_bound=<steps>

``logit_onset``: the first step after ``judge.SETTLE`` whose logit is ``--rise`` times the median of
the settled steps before it (the precursor visibly starts); ``logit_watched``: the first step at
the attention predictor's ``watch_from`` (1e2); ``diverged``: the loss leaves the twin's band
(the zoo's one definition); ``lead_bound = diverged - logit_onset``: an upper bound on the lead of
a predictor that needed no points at all.  ``--rewarm START,RAMP,FACTOR`` raises the LR linearly
by FACTOR from START over RAMP steps (a re-warmed schedule, as continual pre-training uses), so the
instability starts mid-run from a healthy model:

    python benchmarks/precursor_onset.py [--scenario attn] [--lr 3e-3 --warmup 20 --rewarm 150,100,100 --steps 400]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.zoo.judge import SETTLE, band, divergence_step, trailing  # noqa: E402
from benchmarks.zoo.models import build, forward  # noqa: E402
from benchmarks.zoo.scenarios import SCENARIOS, Scenario  # noqa: E402
from benchmarks.zoo.train import _optimizer, _schedule  # noqa: E402
from examples.tiny_gpt import Windows, stdlib_corpus  # noqa: E402

WATCH_FROM = 100.0
FUSED = ("attn.c_attn", "qkv")  # the zoo's gpt and plain models


def run(s: Scenario, seed: int, init_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step losses and largest attention logits of ``s`` (logits NaN with QK-norm on)."""
    torch.manual_seed(init_seed)
    model = build(s.model)
    opt = _optimizer(s, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
    loader = torch.utils.data.DataLoader(Windows(stdlib_corpus(), s.model.block_size, s.steps * s.batch, seed=seed),
                                         batch_size=s.batch)  # fmt: skip
    now: list[float] = []

    def hook(_mod, _inp, out: torch.Tensor) -> None:
        q, k, _ = out.detach().chunk(3, dim=-1)
        B, T, C = q.shape
        h = s.model.n_head
        q, k = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k))
        now.append(float((q @ k.transpose(-1, -2)).max()) / math.sqrt(C // h))

    hooked = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(FUSED)]
    if not hooked:
        raise SystemExit(f"scenario model kind {s.model.kind!r} has no fused qkv projection; use kind gpt or plain")
    losses, logits = [], []
    for x, y in loader:
        now.clear()
        loss = forward(model, x, y)[1]
        loss.backward()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        logits.append(math.nan if s.model.qk_norm else max(now))
        if len(losses) >= s.steps:
            break
    return np.array(losses), np.array(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    attn = [s.name for s in SCENARIOS if s.group == "attn_logit" and s.model.kind in ("gpt", "plain")]
    parser.add_argument("--scenario", default="attn", choices=attn, help="a zoo attention scenario")
    parser.add_argument("--rewarm", default=None, help="START,RAMP,FACTOR: a mid-run linear LR rise")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: the scenario's)")
    parser.add_argument("--lr", type=float, default=None, help="peak LR (default: the scenario's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the scenario's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="print every N steps")
    parser.add_argument("--rise", type=float, default=3.0, help="logit_onset: this many times the settled median")
    args = parser.parse_args()
    s = next(x for x in SCENARIOS if x.name == args.scenario)
    if args.rewarm:
        try:
            start, ramp, factor = args.rewarm.split(",")
            s = replace(s, rewarm=(int(start), max(1, int(ramp)), float(factor)))
        except ValueError:
            parser.error(f"--rewarm wants START,RAMP,FACTOR, got {args.rewarm!r}")
    for key in ("steps", "lr", "warmup"):
        if getattr(args, key) is not None:
            if getattr(args, key) <= 0:
                parser.error(f"--{key} must be positive")
            s = replace(s, **{key: getattr(args, key)})
    twin = s.twin()
    print(f"{s.name}: lr {s.lr} warm-up {s.warmup} rewarm {s.rewarm} clip {s.clip}, {s.steps} steps; "
          "training run, twin and noise twin", file=sys.stderr, flush=True)  # fmt: skip
    loss, logit = run(s, args.seed, args.seed)
    twin_loss, _ = run(twin, args.seed, args.seed)
    noise_loss, _ = run(twin, args.seed, args.seed + 1000)
    width = band(list(twin_loss), list(noise_loss))
    div = divergence_step(list(loss), list(twin_loss), width)
    gap = trailing(loss - twin_loss)
    print(f"noise band {width:.3f}")
    print(f"{'step':>5} {'loss':>7} {'twin':>7} {'gap':>7} {'max logit':>10}")
    for t in range(0, len(loss), args.every):
        mark = " <- diverged" if div is not None and t <= div < t + args.every else ""
        print(f"{t:5d} {loss[t]:7.3f} {twin_loss[t]:7.3f} {gap[t]:+7.3f} {logit[t]:10.4g}{mark}")
    onset = None
    for t in range(SETTLE + 1, len(logit)):
        if logit[t] >= args.rise * statistics.median(logit[SETTLE:t]):
            onset = t
            break
    watched = next((t for t in range(len(logit)) if logit[t] >= WATCH_FROM), None)
    bound = None if onset is None or div is None else div - onset
    print(f"logit_onset={onset} logit_watched={watched} diverged={div} lead_bound={bound}")


if __name__ == "__main__":
    main()
