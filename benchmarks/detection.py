"""Detection suite: does a real agent see the spikes of a tiny GPT in time, and stay quiet otherwise?

Every scenario is one real training run of the tiny GPT of ``benchmarks/recovery.py`` (2 blocks,
d=64, context 64, batch 16, AdamW, 20 warm-up steps) on the standard library's source, with
sentinel attached (statistics every step, checkpoints every 20 steps in a temporary directory,
good after 10 clean steps) and a real ``sentinel-agent`` process watching it with its default
detectors.  The agent's policy is the default rule set with shorter rollbacks that fit a run of
a few hundred steps (as in recovery.py): a critical ``nonfinite`` or ``loss_spike`` rolls back
(steps_back 10, skip 40), a critical ``grad_norm_spike`` skips one update, and every other
detection is a ``warn``.  Every run stops when its model holds ``--steps`` updates (``sn.step``: a
rollback winds it back), or after 3 × ``--steps`` trained steps.

Scenarios:

* ``lr=<x>``: a high learning rate (default 3e-2, 1e-1 and 3e-1) with gradient clipping off; the tiny
  GPT has no QK-norm, so the attention logits may grow until the loss spikes.
* ``random`` / ``constant``: batches [``--bad-start``, +``--bad-length``) replaced by random bytes
  or one repeated byte (the bad-batch region of recovery.py), clipping at 1.0 as there.
* ``nan``: at trained step ``--nan-step`` the loss is multiplied by NaN before ``backward`` (once:
  the rolled-back run does not meet it again), so the gradients and the update are NaN.
* ``clean``: the normal LR 3e-3, clipping at 1.0: any agent decision other than ``warn`` is a
  false alarm; warnings are counted separately.

Measured per run, in *trained* steps (every step taken, including those a rollback takes back;
the agent's (timeline epoch, step) of a detection is mapped back to the trained step that sent it):

* **spike**: the first trained step whose loss exceeds 2 × the EMA (α 0.98) of the run's own
  earlier losses (the EMA starts at the first loss); a non-finite loss is a spike too.  A high-LR
  run without one is ``no spike`` and is not counted as a spike scenario.
* **detected**: an agent detection (a ``decision`` or ``suppressed`` record in ``events.jsonl``,
  severity warning or critical) at or up to ``--lead-window`` steps before the spike; ``late`` when
  the first one comes only after it (within the window), ``no`` otherwise.
* **lead**: spike step − first detection step in that window (negative when late).
* **recovery**, where the agent sent a corrective command (rollback or skip_update) that the
  trainer acknowledged ``applied``: for a bad-batch region, the validation loss on fixed held-out
  batches against a clean run and an unrecovered bad run of the same seed (the bad one without
  sentinel; the clean one is the ``clean`` scenario's run of that seed when the agent corrected
  nothing there, since watching does not change the training, else a run without sentinel),
  recovered when the run closes ≥ 75 % of the gap; for NaN, recovered when every
  checkpoint restored is finite and the final loss and validation loss are finite; for a high LR,
  recovered when the final validation loss is finite and no higher than the loss EMA before the
  spike.

Prints one row per scenario, and as its last line
``detected=<n>/<spike scenarios> false_alarms=<n> recovered=<n>/<recovery attempted>``.

    python benchmarks/detection.py [--steps 200] [--seeds 0,1] [--high-lrs 3e-2,1e-1] [--bad-seeds 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sentinel  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402
from examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus  # noqa: E402

try:  # the bad-batch region: examples/tiny_gpt.py's BadRegion, else recovery.py's Corrupted
    from examples.tiny_gpt import BadRegion  # noqa: E402
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recovery import Corrupted as BadRegion  # noqa: E402

CFG = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
BATCH = 16
EMA_ALPHA = 0.98
SPIKE_RATIO = 2.0
CORRECTIVE = ("rollback", "skip_update", "skip_batches", "lr_scale", "stop")


def agent_config(steps_back: int, skip: int) -> dict:
    rollback = {"steps_back": steps_back, "skip": skip}
    return {
        "policy": {
            "rules": [
                {"detector": "nonfinite", "severity": "critical", "action": "rollback", "args": rollback},
                {"detector": "loss_spike", "severity": "critical", "action": "rollback", "args": rollback},
                {"detector": "grad_norm_spike", "severity": "critical", "action": "skip_update", "args": {"steps": 1}},
                {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
            ]
        }
    }


def train(
    seed: int,
    steps: int,
    lr: float,
    clip: float | None,
    bad: tuple[str, int, int] | None = None,
    nan_step: int | None = None,
    agent: AgentProcess | None = None,
    ckpt: str | None = None,
    run: str = "detection",
) -> dict:
    """One run; returns its losses and published step per trained step, rewinds and validation loss."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    tokens = stdlib_corpus()
    data: torch.utils.data.Dataset = Windows(tokens, CFG.block_size, (3 * steps + 1000) * BATCH, seed=seed)
    if bad is not None:
        kind, start, length = bad
        data = BadRegion(data, start * BATCH, (start + length) * BATCH, kind)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    held_out = [Windows(tokens, CFG.block_size, 256, seed=99_999)[i] for i in range(256)]
    xv, yv = torch.stack([x for x, _ in held_out]), torch.stack([y for _, y in held_out])

    config: dict = {"run": run, "log_level": "error", "stats": {"enabled": agent is not None}}
    if agent is not None:
        config |= {
            "publish": {"endpoint": agent.stats_endpoint},
            "control": {"endpoint": agent.commands_endpoint},
            "checkpoint": {"dir": ckpt, "every": 20, "good_after": 10, "keep": 3},
        }
    else:
        config |= {"publish": {"enabled": False}, "control": {"enabled": False}}
    sn = sentinel.attach(model, opt, config=config, lr_scheduler=schedule)
    losses: list[float] = []
    published: list[int] = []  # sn.step at each trained step's observe()
    rewinds: list[dict] = []  # where the trainer went back, and whether what it restored is finite
    for x, y in sn.batches(loader):
        _, loss = model(x, y)
        if nan_step is not None and len(losses) == nan_step:
            loss = loss * float("nan")
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        published.append(sn.step)
        losses.append(loss.item())
        before = sn.step
        sn.observe(loss=loss)
        if sn.step != before + 1:  # a rollback restored a checkpoint at this boundary
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            rewinds.append({"trained": len(losses), "from": before, "to": sn.step, "finite": finite})
        if sn.step >= steps or len(losses) >= 3 * steps:
            break
    sn.close()
    with torch.no_grad():
        val = model(xv, yv)[1].item()
    return {"losses": losses, "published": published, "rewinds": rewinds, "val": val}


def first_spike(losses: list[float]) -> tuple[int | None, float]:
    """The first trained step whose loss is > 2 × the EMA of the earlier losses, and that EMA."""
    ema = None
    for t, x in enumerate(losses):
        if ema is not None and (not math.isfinite(x) or x > SPIKE_RATIO * ema):
            return t, ema
        if math.isfinite(x):
            ema = x if ema is None else EMA_ALPHA * ema + (1 - EMA_ALPHA) * x
    return None, float("nan") if ema is None else ema


def trained_index(published: list[int]) -> dict[tuple[int, int], int]:
    """(timeline epoch, step) -> trained step: a new epoch starts where the step does not go up."""
    index, epoch = {}, 0
    for t, step in enumerate(published):
        if t and step <= published[t - 1]:
            epoch += 1
        index.setdefault((epoch, step), t)
    return index


def run_scenario(name: str, seed: int, args: argparse.Namespace, **kw) -> dict:
    """One run with a live agent; the events it wrote, mapped onto trained steps."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = agent_config(args.steps_back, args.skip)
        with AgentProcess(Path(tmp) / "agent", config=cfg) as agent:
            t0 = time.perf_counter()
            result = train(seed, args.steps, agent=agent, ckpt=str(Path(tmp) / "ckpt"), run=f"{name}-{seed}", **kw)
            result["seconds"] = time.perf_counter() - t0
            time.sleep(1.0)  # let the agent finish the last messages
            lines = Path(agent.events_path).read_text().splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    index = trained_index(result["published"])
    detections = []
    for e in events:
        if e.get("type") not in ("decision", "suppressed"):
            continue
        t = index.get((e.get("epoch", 0), e.get("step")), e.get("clock"))
        detections.append({**e, "trained": t})
    result["detections"] = detections
    result["decisions"] = [d for d in detections if d["type"] == "decision"]
    result["acks"] = {e["id"]: e for e in events if e.get("type") == "ack"}
    applied = []
    for d in result["decisions"]:
        for c in d.get("commands", []):
            ack = result["acks"].get(c["id"], {})
            applied.append((c["action"], d["trained"], ack.get("status", "no-ack")))
    result["applied"] = applied
    return result


def judge(
    name: str, seed: int, r: dict, args: argparse.Namespace, window: int, fault: tuple[int, int] | None = None
) -> dict:
    spike, ema = first_spike(r["losses"])
    row = {"name": name, "seed": seed, "spike": spike, "ema": ema, "detected": "-", "lead": None}
    if fault is not None:  # an injected fault at trained steps [lo, hi): only detections inside it count
        lo, hi = fault
        inside = sorted(d["trained"] for d in r["detections"] if d["trained"] is not None and lo <= d["trained"] < hi)
        if inside:
            row["detected"], row["lead"] = ("yes" if inside[0] == lo else "late"), lo - inside[0]
        else:
            row["detected"] = "no"
    elif spike is not None:
        near = sorted(d["trained"] for d in r["detections"] if d["trained"] is not None)
        before = [t for t in near if spike - window <= t <= spike]
        after = [t for t in near if spike < t <= spike + window]
        if before:
            row["detected"], row["lead"] = "yes", spike - before[0]
        elif after:
            row["detected"], row["lead"] = "late", spike - after[0]
        else:
            row["detected"] = "no"
    counts: dict[str, int] = {}
    for d in r["decisions"]:
        counts[d["action"]] = counts.get(d["action"], 0) + 1
    row["actions"] = ",".join(f"{a}×{n}" for a, n in sorted(counts.items())) or "none"
    row["commands"] = [f"{a}@{t}:{s}" for a, t, s in r["applied"] if a != "warn"]
    row["detectors"] = sorted({f"{d['detector']}/{d['severity']}" for d in r["detections"]})
    row["suppressed"] = sum(d["type"] == "suppressed" for d in r["detections"])
    row["timeline"] = [f"{d['detector']}/{d['severity'][0]}@{d['trained']}" for d in r["detections"]][:8]
    row["attempted"] = any(a in CORRECTIVE and s == "applied" for a, _, s in r["applied"])
    row["val"] = r["val"]
    row["final_loss"] = r["losses"][-1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="updates the model holds at the end of a run")
    parser.add_argument("--seeds", default="0,1", help="seeds of the high-LR and clean runs")
    parser.add_argument("--high-lrs", default="3e-2,1e-1,3e-1")
    parser.add_argument("--bad-seeds", default="0", help="seeds of each bad-batch kind")
    parser.add_argument("--bad-start", type=int, default=120)
    parser.add_argument("--bad-length", type=int, default=20)
    parser.add_argument("--nan-seeds", default="0")
    parser.add_argument("--nan-step", type=int, default=120)
    parser.add_argument("--lr", type=float, default=3e-3, help="the normal LR")
    parser.add_argument("--steps-back", type=int, default=10)
    parser.add_argument("--skip", type=int, default=40)
    parser.add_argument("--lead-window", type=int, default=100, help="steps before/after a spike a detection counts")
    parser.add_argument("--only", default="highlr,bad,nan,clean", help="scenario groups to run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    only = set(args.only.split(","))
    W = args.lead_window
    rows = []

    def done(row: dict) -> None:
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("ema",)}
        print(json.dumps(brief, default=str), file=sys.stderr, flush=True)

    clean_val: dict[int, float] = {}  # validation loss of the clean run per seed, reused as the reference
    if "clean" in only:
        for seed in seeds:
            r = run_scenario("clean", seed, args, lr=args.lr, clip=1.0)
            row = judge("clean", seed, r, args, W)
            row["kind"] = "clean"
            row["false_alarms"] = sum(d["action"] != "warn" for d in r["decisions"])
            row["warnings"] = sum(d["action"] == "warn" for d in r["decisions"])
            row["outcome"] = f"val {r['val']:.3f}; false alarms {row['false_alarms']}, warnings {row['warnings']}"
            done(row)
            if row["false_alarms"] == 0:  # no correction: the same run as without sentinel
                clean_val[seed] = r["val"]

    if "highlr" in only:
        for lr in [float(x) for x in args.high_lrs.split(",") if x]:
            for seed in seeds:
                r = run_scenario(f"lr={lr:g}", seed, args, lr=lr, clip=None)
                row = judge(f"lr={lr:g}", seed, r, args, W)
                row["kind"] = "highlr"
                if row["attempted"]:
                    row["recovered"] = math.isfinite(r["val"]) and row["spike"] is not None and r["val"] <= row["ema"]
                    row["outcome"] = f"val {r['val']:.3f} vs pre-spike EMA {row['ema']:.3f}"
                else:
                    row["outcome"] = f"val {r['val']:.3f}, no correction applied"
                done(row)

    if "bad" in only:
        for kind in ("random", "constant"):
            for seed in [int(s) for s in args.bad_seeds.split(",") if s]:
                region = (kind, args.bad_start, args.bad_length)
                clean = clean_val.get(seed)
                if clean is None:
                    clean = clean_val[seed] = train(seed, args.steps, args.lr, 1.0)["val"]
                broken = train(seed, args.steps, args.lr, 1.0, bad=region)["val"]
                r = run_scenario(kind, seed, args, lr=args.lr, clip=1.0, bad=region)
                row = judge(kind, seed, r, args, W, fault=(args.bad_start, args.bad_start + args.bad_length))
                row["kind"] = "bad"
                gap = broken - clean
                closed = (broken - r["val"]) / gap if gap > 0 else float("nan")
                row["outcome"] = f"val {r['val']:.3f} (clean {clean:.3f}, bad {broken:.3f}, closed {closed:.0%})"
                if row["attempted"]:
                    row["recovered"] = closed >= 0.75
                done(row)

    if "nan" in only:
        for seed in [int(s) for s in args.nan_seeds.split(",") if s]:
            r = run_scenario("nan", seed, args, lr=args.lr, clip=1.0, nan_step=args.nan_step)
            row = judge("nan", seed, r, args, W, fault=(args.nan_step, args.nan_step + 10))
            row["kind"] = "nan"
            restored = [f"{w['from']}->{w['to']}{'' if w['finite'] else ' (NaN!)'}" for w in r["rewinds"]]
            ok = all(w["finite"] for w in r["rewinds"]) and math.isfinite(r["losses"][-1]) and math.isfinite(r["val"])
            row["outcome"] = f"restored {', '.join(restored) or 'nothing'}; final loss {r['losses'][-1]:.3f}"
            if row["attempted"]:
                row["recovered"] = ok and bool(r["rewinds"])
            done(row)

    print(
        f"tiny GPT 2x64, {args.steps} updates per run; spike = loss > {SPIKE_RATIO:g}x its EMA (alpha {EMA_ALPHA}); "
        f"detection window {W} steps; rollback(steps_back={args.steps_back}, skip={args.skip}); "
        f"wall {time.perf_counter() - start:.0f} s"
    )
    head = f"{'scenario':<10} {'seed':>4} {'spiked':>7} {'detected':>8} {'lead':>5}  {'agent actions':<28} outcome"
    print(head)
    print("-" * len(head))
    order = ["highlr", "bad", "nan", "clean"]
    rows.sort(key=lambda r: order.index(r["kind"]))
    for r in rows:
        spiked = "no spike" if r["spike"] is None else f"@{r['spike']}"
        lead = "-" if r["lead"] is None else str(r["lead"])
        rec = {True: " [recovered]", False: " [NOT recovered]"}.get(r.get("recovered"), "")
        print(f"{r['name']:<10} {r['seed']:>4} {spiked:>8} {r['detected']:>8} {lead:>5}  {r['actions']:<28} ", end="")
        print(f"{r['outcome']}{rec}")
        if r["commands"] or r["detectors"]:
            print(f"{'':<16}commands {r['commands'] or '[]'}; suppressed {r['suppressed']}; detections {r['timeline']}")
    spike_rows = [r for r in rows if r["kind"] in ("bad", "nan") or (r["kind"] == "highlr" and r["spike"] is not None)]
    detected = sum(r["detected"] == "yes" for r in spike_rows)
    false_alarms = sum(r.get("false_alarms", 0) for r in rows)
    attempted = [r for r in rows if "recovered" in r]
    recovered = sum(bool(r["recovered"]) for r in attempted)
    print(f"detected={detected}/{len(spike_rows)} false_alarms={false_alarms} recovered={recovered}/{len(attempted)}")


if __name__ == "__main__":
    main()
