"""Step-time overhead of sentinel on the tiny GPT, against the same training without it.

Three variants train identical models on identical data, interleaved in rounds so that
machine noise hits all of them alike:
  bare      the plain loop;
  sentinel  sentinel attached, statistics every step, publishing to a live agent process;
  callback  what callback-based monitors do today: copy the parameters before the step, then
            per parameter grad/param/update ``.norm().item()`` after it (one host sync each).
With ``--probes K`` a fourth variant joins them:
  probes    as sentinel, plus every forward probe (docs/probes.md) every K steps;
it prints ``probes_ratio=<probes/bare>`` and ``probes_vs_sentinel=<probes/sentinel>``, both
from mean step times: the probes work on one step in K, which a median would hide.  It also
times forward+backward alone, interleaved with and without the probes armed (the minimum of
each, the figure least disturbed by other load), and counts the hooks left on unsampled steps:
``probe_step_ratio=<sampled/plain>``, ``probe_amortized_ratio=<1 + (sampled/plain - 1) / K>``.
With ``--grad-hooks`` it also times the pre-clip gradient hooks (sentinel/gradnorms.py) on a
backward that only accumulates each gradient (so the hooks' own cost shows): per tensor, what
a registered but idle hook (returning at once) adds to each backward,
``grad_hooks_idle_us_per_tensor``, and what one register-and-remove costs,
``grad_hooks_register_remove_us_per_tensor`` (the two ways to leave an unneeded step alone);
and what the armed hooks cost per backward of the tiny GPT, ``grad_hooks_armed_us``.
A second model shape, nanoGPT's small configuration (2 layers, width 128: fewer FLOPs per
tensor, so sentinel's per-tensor costs weigh more), trains bare and with sentinel in the same
rounds: ``overhead_ratio_2x128=<sentinel/bare>``.  With ``--breakdown`` it also splits
sentinel's per-step cost on the tiny GPT into its parts, each the minimum over repeated calls
(the figure least disturbed by other load), in microseconds: the pre-clip gradient hooks
(``cost_grad_hooks_us``), the per-tensor reductions after the step (``cost_reductions_us``:
norms, √v̂, the update rebuilt from Adam's state), packing, host transfer, serialisation and
send of the message (``cost_publish_us``), and the command poll at the step boundary
(``cost_control_us``).
Prints the median step time of each and its ratio to bare; the last line is
``overhead_ratio=<sentinel/bare>`` (the tiny GPT).

    python benchmarks/overhead.py [--rounds 6] [--steps 25] [--threads 2] [--probes 10] [--grad-hooks] [--breakdown]
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


SECOND_SHAPE = GPTConfig(n_layer=2, n_head=4, n_embd=128)  # nanoGPT model.py, 2 layers, width 128


class Variant:
    def __init__(self, name: str, tc: TrainConfig, endpoint: str, probes_every: int = 10, gpt: GPTConfig | None = None):
        self.name = name
        self.model, self.optimizer, self.schedule, loader = make_run(tc, gpt or GPTConfig())
        self.batches = iter(loader)
        self.times: list[float] = []
        self.sn = None
        self.cb = None
        if name == "sentinel":
            run = "overhead" if gpt is None else "overhead-2x128"
            self.sn = sentinel.attach(self.model, self.optimizer, run=run, publish={"endpoint": endpoint})
        elif name == "probes":
            self.sn = sentinel.attach(
                self.model,
                self.optimizer,
                run="overhead-probes",
                publish={"endpoint": endpoint},
                probes={"enabled": True, "every": probes_every},
            )
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


def probe_step_cost(every: int, reps: int = 20) -> tuple[float, int]:
    """(sampled-step forward+backward time / plain, hooks registered on an unsampled step)."""
    from sentinel.probes import Probes
    from sentinel.roles import assign_roles

    tc = TrainConfig(steps=1, batch_size=24)
    model, _, _, loader = make_run(tc, GPTConfig())
    x, y = next(iter(loader))
    probes = Probes(model, assign_roles(model), every=every)

    def timed(step: int) -> float:
        probes.begin_step(step)
        start = time.perf_counter()
        model(x, y)[1].backward()
        probes.collect()
        return time.perf_counter() - start

    plain, sampled = [], []
    for _ in range(3):
        timed(1), timed(0)
    for _ in range(reps):
        plain.append(timed(1))
        sampled.append(timed(0))
    probes.begin_step(1)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return min(sampled) / min(plain), hooks


def grad_hook_cost(reps: int = 20, per: int = 10, stand_ins: int = 2000) -> dict[str, float]:
    """Per tensor: microseconds an idle gradient hook adds to a backward, and one register+remove
    cycle costs; and the armed hooks' cost per backward of the tiny GPT.

    The backward only accumulates a gradient into each parameter (``Σ p.sum()``), so its own
    cost is equal in every mode and the difference is the hooks'.  Idle against absent is timed
    on ``stand_ins`` one-element tensors (an idle hook costs the same whatever the tensor, and
    the count lifts it above timer noise), armed against absent on the tiny GPT's parameters.
    Each sample is ``per`` backward passes in one mode, modes in rotating order; minima count.
    """
    from sentinel.gradnorms import GradNorms

    params = list(make_run(TrainConfig(steps=1, batch_size=1), GPTConfig())[0].parameters())
    small = [torch.nn.Parameter(torch.zeros(1)) for _ in range(stand_ins)]
    on_small, idle = GradNorms(small), GradNorms(small, persistent=True)
    on_model = GradNorms(params)
    setup = {
        "absent_small": (small, lambda: (on_small.disarm(), idle.close())),
        "idle_small": (small, lambda: (on_small.disarm(), idle.arm(), idle.disarm())),  # registered, returning at once
        "absent_model": (params, on_model.disarm),
        "armed_model": (params, on_model.arm),
    }

    def sample(mode: str) -> float:
        tensors, prepare = setup[mode]
        prepare()
        start = time.perf_counter()
        for _ in range(per):
            sum(p.sum() for p in tensors).backward()
            for p in tensors:
                p.grad = None
        return (time.perf_counter() - start) / per

    modes = list(setup)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(reps):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            times[m].append(sample(m))
    for g in (on_small, idle, on_model):
        g.close()
    cycles = []
    for _ in range(reps):
        start = time.perf_counter()
        on_small.arm()
        on_small.disarm()
        cycles.append(time.perf_counter() - start)
    best = {k: min(v) * 1e6 for k, v in times.items()}
    return {
        "params": float(len(params)),
        "idle_us_per_tensor": (best["idle_small"] - best["absent_small"]) / stand_ins,
        "register_remove_us_per_tensor": min(cycles) * 1e6 / stand_ins,
        "armed_us": best["armed_model"] - best["absent_model"],
    }


def cost_breakdown(endpoint: str, reps: int = 15) -> dict[str, float]:
    """Microseconds per statistics step of each part of sentinel's work on the tiny GPT (minima)."""
    tc = TrainConfig(steps=4 * reps + 10, batch_size=24)
    model, optimizer, _, loader = make_run(tc, GPTConfig())
    sn = sentinel.attach(model, optimizer, run="overhead-breakdown", publish={"endpoint": endpoint})
    batches = iter(loader)

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e6

    def backward(armed: bool) -> None:
        x, y = next(batches)
        (sn.grads.arm if armed else sn.grads.disarm)()
        model(x, y)[1].backward()
        optimizer.zero_grad(set_to_none=True)

    x, y = next(batches)
    model(x, y)[1].backward()
    optimizer.step()  # Adam state exists, statistics ran once
    sn.observe(loss=1.0)
    out = {"grad_hooks": max(0.0, best(lambda: backward(True)) - best(lambda: backward(False)))}
    out["reductions"] = best(lambda: sn.stats.after_step(None))

    def publish() -> None:
        sn._pending = sn.stats.after_step(None)
        start = time.perf_counter()
        sn._publish(time.perf_counter(), 1.0, {})
        return time.perf_counter() - start

    out["publish"] = min(publish() for _ in range(reps)) * 1e6
    out["control"] = best(lambda: sn.control.boundary(None, None))
    sn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument(
        "--probes", type=int, default=0, metavar="K", help="also time sentinel with every probe on every K steps"
    )
    parser.add_argument(
        "--grad-hooks", action="store_true", help="also time the gradient hooks: armed, idle, registered and removed"
    )
    parser.add_argument("--breakdown", action="store_true", help="also split sentinel's per-step cost into its parts")
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
        names = ("bare", "sentinel", "callback") + (("probes",) if args.probes else ())
        variants = [Variant(name, tc, agent.stats_endpoint, args.probes) for name in names]
        variants += [
            Variant(f"{name}-2x128", tc, agent.stats_endpoint, gpt=SECOND_SHAPE) for name in ("bare", "sentinel")
        ]
        n = len(variants)
        for r in range(args.rounds):
            for v in variants[r % n :] + variants[: r % n]:
                v.run(args.steps)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        sn = variants[1].sn
        counters = sn.counters
        for v in variants:
            if v.sn is not None:
                v.sn.close()
        breakdown = cost_breakdown(agent.stats_endpoint) if args.breakdown else None
        received = agent.metrics_text()

    bare = statistics.median(variants[0].times)
    bare_mean = statistics.fmean(variants[0].times)
    second = [v for v in variants if v.name.endswith("-2x128")]
    variants = [v for v in variants if v not in second]
    print(f"\n{'variant':<10} {'median step':>12} {'ratio':>7} {'mean step':>12} {'ratio':>7}")
    ratios, mean_ratios = {}, {}
    for v in variants:
        med, mean = statistics.median(v.times), statistics.fmean(v.times)
        ratios[v.name], mean_ratios[v.name] = med / bare, mean / bare_mean
        print(
            f"{v.name:<10} {med * 1e3:>9.1f} ms {ratios[v.name]:>7.3f} {mean * 1e3:>9.1f} ms {mean_ratios[v.name]:>7.3f}"
        )
    print(
        f"\nsentinel published {counters['sent']} messages, dropped {counters['dropped']}, errors {counters['errors']}"
    )
    assert "sentinel_loss" in received, "the agent never exported the run's loss"
    small_bare = statistics.median(second[0].times)
    small = statistics.median(second[1].times) / small_bare
    print(
        f"second shape, {SECOND_SHAPE.n_layer} layers, d={SECOND_SHAPE.n_embd}: bare {small_bare * 1e3:.1f} ms, "
        f"sentinel {statistics.median(second[1].times) * 1e3:.1f} ms"
    )
    print(f"callback_ratio={ratios['callback']:.3f}")
    print(f"overhead_ratio_2x128={small:.3f}")
    if args.probes:
        assert "sentinel_layer_attention_logit_max" in received, "the agent never exported the probe statistics"
        print(f"probes_ratio={mean_ratios['probes']:.3f}")
        print(f"probes_vs_sentinel={mean_ratios['probes'] / mean_ratios['sentinel']:.3f}")
        step_ratio, hooks = probe_step_cost(args.probes)
        assert hooks == 0, f"{hooks} hooks registered on an unsampled step"
        print(f"hooks_on_unsampled_steps={hooks}")
        print(f"probe_step_ratio={step_ratio:.3f}")
        print(f"probe_amortized_ratio={1 + (step_ratio - 1) / args.probes:.4f}")
    if args.grad_hooks:
        cost = grad_hook_cost()
        print(f"grad_hooks_idle_us_per_tensor={cost['idle_us_per_tensor']:.2f}")
        print(f"grad_hooks_register_remove_us_per_tensor={cost['register_remove_us_per_tensor']:.2f}")
        print(f"grad_hooks_armed_us={cost['armed_us']:.0f}  # {cost['params']:.0f} tensors, per backward")
    if breakdown is not None:
        for part, us in breakdown.items():
            print(f"cost_{part}_us={us:.0f}  # {us / (bare * 1e6) * 100:.2f} % of the bare step")
    print(f"overhead_ratio={ratios['sentinel']:.3f}")


if __name__ == "__main__":
    main()
