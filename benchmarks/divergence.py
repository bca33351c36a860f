"""The divergence zoo: real instabilities of small models on CPU, each against a real agent, beside its
stable twin; recall, lead time, precision, false alarms and prevention, measured.

Every scenario of ``benchmarks/zoo/scenarios.py`` (a mechanism, a model, its settings) is trained
from each seed in five runs, each watched by a real ``sentinel-agent`` process with the default
predictors (``benchmarks/zoo/runner.py``):

* ``twin``: the stable twin (the cause removed), watched with the default policy: a clean run;
* ``noise``: the twin from another initialisation on the same batches: a clean run, and the twin's
  noise band (benchmarks/zoo/judge.py defines divergence against it);
* ``advise``: the scenario with an agent that decides but sends nothing: the run as unwatched, and
  what the agent said about it, when;
* ``watch``: the scenario with the default policy (reacting to the loss: rollback on a critical loss
  spike or NaN);
* ``prevent``: the scenario with ``policy.prevention`` on (acting on critical forecasts before the
  loss moves).

Twins shared by several scenarios run once.  The clean scenarios run once per seed, watched.  Prints
one row per (scenario, seed), a row per mechanism, and as its last line

    recall=<r> median_lead=<steps> min_lead=<steps> precision=<p> false_warnings_per_1k=<f> false_actions=<n> prevented=<k>/<n>

``--quick`` runs a subset for the test suite (about 3 minutes on 2 cores); ``--json`` writes every
row and run for later reading.

    python benchmarks/divergence.py [--quick] [--seeds 0,1,2] [--only attn,lr_fault] [--jobs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.zoo.judge import Row, clean_tally, judge, summary  # noqa: E402
from benchmarks.zoo.runner import Agents, Arm, Endpoint, run_arm  # noqa: E402
from benchmarks.zoo.scenarios import HELDOUT, QUICK, SCENARIOS, Scenario  # noqa: E402

NOISE_SEED = 1000


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))


def _task(agent: Endpoint, arm: str, s: Scenario, seed: int, init: int | None, probes_every: int) -> Arm:
    return run_arm(agent, arm, s, seed, init, probes_every)


def twin_key(s: Scenario) -> str:
    """Scenarios whose twins are the same run share them."""
    return repr(dataclasses.replace(s.twin(), name="twin"))


def plan(scenarios: list[Scenario], seeds: list[int]) -> tuple[list[tuple[str, str, Scenario, int, int | None]], dict]:
    """(key, arm, scenario, seed, init seed) of every run, and the name each (twin, seed) runs under."""
    runs, twins = [], {}
    for s in scenarios:
        for seed in seeds:
            if s.clean:
                runs.append((f"clean|{s.name}|{seed}", "watch", s, seed, None))
                continue
            key = twin_key(s)
            if (key, seed) not in twins:
                twins[(key, seed)] = s.twin().name
                runs.append((f"twin|{s.twin().name}|{seed}", "watch", s.twin(), seed, None))
                runs.append((f"noise|{s.twin().name}|{seed}", "watch", s.twin(), seed, seed + NOISE_SEED))
            for arm in ("advise", "watch", "prevent"):
                runs.append((f"{arm}|{s.name}|{seed}", arm, s, seed, None))
    return runs, twins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the test suite's subset (seed 0, four scenarios)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--only", default="", help="comma-separated scenario names or mechanism groups")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    parser.add_argument("--probes-every", type=int, default=10, help="the trainer's probes.every")
    parser.add_argument("--json", default=None, help="write rows, summary and runs to this file")
    parser.add_argument(
        "--prevention",
        default="{}",
        help="policy.prevention keys for the prevent arm, as JSON: '{\"lr_factor\": 0.25}'",
    )
    args = parser.parse_args()
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if x]
    chosen = [s for s in SCENARIOS if s.name in QUICK] if args.quick else [*SCENARIOS, *HELDOUT]
    if args.only:
        want = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in want or s.group in want or ("heldout" in want and s in HELDOUT)]
    if not chosen:
        parser.error(f"no scenario matches --only {args.only!r}")
    runs, twins = plan(chosen, seeds)
    start = time.perf_counter()
    print(f"divergence zoo: {len(chosen)} scenarios x {len(seeds)} seed(s), {len(runs)} runs, {args.jobs} at a time",
          file=sys.stderr, flush=True)  # fmt: skip
    results: dict[str, Arm] = {}
    try:
        prevention = json.loads(args.prevention)
    except json.JSONDecodeError as exc:
        parser.error(f"--prevention is not JSON: {exc}")
    with tempfile.TemporaryDirectory(prefix="sentinel-zoo-") as tmp, Agents(Path(tmp), prevention) as agents:
        eps = agents.endpoints
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            futures = {key: pool.submit(_task, eps[arm], arm, s, seed, init, args.probes_every)
                       for key, arm, s, seed, init in runs}  # fmt: skip
            for i, (key, fut) in enumerate(futures.items(), 1):
                results[key] = fut.result()
                r = results[key].result
                print(f"  [{i}/{len(runs)} {time.perf_counter() - start:4.0f} s] {key}: {len(r.losses)} steps, "
                      f"val {r.val:.3f}, {len(results[key].detections)} detection(s)", file=sys.stderr, flush=True)  # fmt: skip
    rows: list[Row] = []
    clean_arms: list[Arm] = []
    seen_twins = set()
    for s in chosen:
        for seed in seeds:
            if s.clean:
                clean_arms.append(results[f"clean|{s.name}|{seed}"])
                continue
            tname = twins[(twin_key(s), seed)]
            twin, noise = results[f"twin|{tname}|{seed}"], results[f"noise|{tname}|{seed}"]
            if (tname, seed) not in seen_twins:
                seen_twins.add((tname, seed))
                clean_arms += [twin, noise]
            arms = {a: results[f"{a}|{s.name}|{seed}"] for a in ("advise", "watch", "prevent")}
            rows.append(judge(s, seed, arms["advise"], twin, noise, arms["watch"], arms["prevent"]))
    clean = clean_tally(clean_arms)
    out = summary(rows, clean)
    report(rows, clean_arms, out, time.perf_counter() - start)
    if args.json:
        doc = {"summary": out, "rows": [dataclasses.asdict(r) for r in rows], "clean": clean,
               "clean_risk": [a.risk for a in clean_arms], "seconds": time.perf_counter() - start}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(rows: list[Row], clean_arms: list[Arm], out: dict, wall: float) -> None:
    head = (f"{'scenario':<16} {'seed':>4} {'band':>5} {'diverged':>8} {'1st warn':>8} {'lead':>5} "
            f"{'val twin/unwatched/react/prevent':>34}  detections (advisory run)")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        vals = "/".join(_fmt(r.val.get(a), ".3f") for a in ("twin", "advise", "watch", "prevent"))
        mark = {True: " prevented", False: " NOT prevented"}.get(r.prevented, "")
        print(f"{r.scenario:<16} {r.seed:>4} {r.band:5.3f} {_fmt(r.diverged, 'd'):>8} {_fmt(r.first_warning, 'd'):>8} "
              f"{_fmt(r.lead, 'd'):>5} {vals:>34}  {' '.join(r.detectors) or '-'}{mark}")  # fmt: skip
        if any(v != "-" for v in r.actions.values()):
            print(f"{'':<16}      actions: watch {r.actions.get('watch')}; prevent {r.actions.get('prevent')}")
    print()
    print(f"{'mechanism':<14} {'runs':>4} {'diverged':>8} {'warned in time':>14} {'median lead':>11} {'prevented':>9}")
    for group in dict.fromkeys(r.group for r in rows):
        g = [r for r in rows if r.group == group]
        d = [r for r in g if r.diverged is not None]
        caught = [r for r in d if r.first_warning is not None]
        leads = sorted(r.lead for r in caught)
        med = leads[len(leads) // 2] if leads else None
        prevented = sum(bool(r.prevented) for r in d)
        print(f"{group:<14} {len(g):>4} {len(d):>8} {len(caught):>14} {_fmt(med, 'd'):>11} {prevented:>5}/{len(d)}")
    warnings, steps, actions = clean_tally(clean_arms)
    for a in clean_arms:
        if a.detections:
            what = " ".join(f"{d['detector']}/{d['severity'][0]}@{d['trained']}" for d in a.detections[:6])
            print(f"clean run {a.name}: {what}")
    held = [a for a in clean_arms if a.name.split(":")[1].startswith("heldout-")]
    if held:
        w, n, act = clean_tally(held)
        print(f"held-out clean runs (architectures and settings no default was fitted on): {len(held)} ({n} steps), "
              f"{w} warning(s), {act} corrective action(s)")  # fmt: skip
    risks = [a.risk for a in clean_arms if a.risk is not None]
    print(f"clean runs: {len(clean_arms)} ({steps} steps), {warnings} warning(s), {actions} corrective action(s), "
          f"final risk at most {max(risks, default=0.0):.2f}; wall {wall:.0f} s")  # fmt: skip
    print(f"recall={_fmt(out['recall'])} median_lead={_fmt(out['median_lead'], '.0f')} min_lead={_fmt(out['min_lead'], '.0f')} "
          f"precision={_fmt(out['precision'])} false_warnings_per_1k={_fmt(out['false_warnings_per_1k'])} "
          f"false_actions={out['false_actions']} prevented={out['prevented']}/{out['prevent_attempted']}")  # fmt: skip


if __name__ == "__main__":
    main()
