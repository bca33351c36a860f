"""One zoo run: a scenario's model trained in a plain user loop with sentinel attached.

The loop is what a user writes (forward, backward, clip, step, zero_grad, schedule, observe);
the faults are injected where they would happen: the LR schedule, the batches, the loss, a
weight.  Every run stops when its model holds ``scenario.steps`` updates (``sn.step``: a rollback
winds it back) or after 3 × that many trained steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import sentinel
from benchmarks.zoo.models import build, forward, head_params
from benchmarks.zoo.scenarios import Scenario
from examples.tiny_gpt import BadRegion, Windows, stdlib_corpus

VAL_BATCHES = 128


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)  # per trained step
    published: list[int] = field(default_factory=list)  # sn.step at each trained step's observe()
    rewinds: list[dict] = field(default_factory=list)
    val: float = math.nan
    seconds: float = 0.0
    lr_scaled: float = 1.0  # product of the lr_scale commands applied
    sentinel_events: list[dict] = field(default_factory=list)


def _schedule(s: Scenario):
    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / max(1, s.warmup))
        if s.schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(step, s.steps) / s.steps))
        elif s.schedule == "wsd":
            f *= min(1.0, max(0.0, (s.steps - step) / (0.2 * s.steps)))
        if s.rewarm is not None:
            start, ramp, to = s.rewarm
            f *= 1 + min(1.0, max(0.0, (step - start) / ramp)) * (to - 1)
        if s.lr_jump is not None and step >= s.lr_jump[0]:
            f *= s.lr_jump[1]
        return f

    return factor


def _optimizer(s: Scenario, model: torch.nn.Module) -> torch.optim.Optimizer:
    head = set(head_params(model)) if s.head_weight_decay is not None else set()
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in head]}]
    if head:
        groups.append({"params": [p for n, p in named if n in head], "weight_decay": s.head_weight_decay})
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, eps=s.eps)


def held_out(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = Windows(stdlib_corpus(), block_size, VAL_BATCHES, seed=99_999)
    items = [w[i] for i in range(VAL_BATCHES)]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def train(s: Scenario, seed: int, sentinel_config: dict, *, init_seed: int | None = None, on_step=None) -> RunResult:
    """Train ``s`` on the batches of ``seed`` from the initialisation of ``init_seed`` (default: ``seed``),
    with ``sentinel_config`` (its run name, endpoints, checkpoints)."""
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = build(s.model)
    opt = _optimizer(s, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
    tokens = stdlib_corpus()
    data: torch.utils.data.Dataset = Windows(tokens, s.model.block_size, (3 * s.steps + 1000) * s.batch, seed=seed)
    if s.bad is not None:
        kind, start, length = s.bad
        data = BadRegion(data, start * s.batch, (start + length) * s.batch, kind)
    loader = torch.utils.data.DataLoader(data, batch_size=s.batch)
    out = RunResult()
    t0 = time.perf_counter()
    sn = sentinel.attach(model, opt, config=sentinel_config, lr_scheduler=schedule)
    params = dict(model.named_parameters())
    for x, y in sn.batches(loader):
        trained = len(out.losses)
        if s.corrupt is not None and trained == s.corrupt[0]:
            with torch.no_grad():
                params[s.corrupt[1]].view(-1)[0] = s.corrupt[2]
        micro = []
        for xm, ym in zip(x.chunk(s.accum), y.chunk(s.accum)):
            logits, loss = forward(model, xm, ym)
            total = loss / s.accum
            if s.z_loss:
                total = total + s.z_loss * torch.logsumexp(logits.float(), dim=-1).square().mean()
            if s.loss_scale is not None:
                total = total * s.loss_scale[0] * 0.5 ** (sn.step / s.loss_scale[1])
            if s.nan_step is not None and trained == s.nan_step:
                total = total * float("nan")
                loss = loss * float("nan")
            total.backward()
            micro.append(loss.detach())
        loss = torch.stack(micro).mean()
        if s.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        out.published.append(sn.step)
        out.losses.append(loss.item())
        before = sn.step
        sn.observe(loss=loss)
        if sn.step != before + 1:  # a rollback restored a checkpoint at this boundary
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            out.rewinds.append({"trained": len(out.losses), "from": before, "to": sn.step, "finite": finite})
        if on_step is not None:
            on_step(sn, out)
        if sn.step >= s.steps or len(out.losses) >= 3 * s.steps:
            break
    out.sentinel_events = list(sn.events)
    sn.close()
    out.seconds = time.perf_counter() - t0
    xv, yv = held_out(s.model.block_size)
    with torch.no_grad():
        out.val = forward(model, xv, yv)[1].item()
    return out
