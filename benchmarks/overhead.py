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
(``cost_control_us``).  With ``--insecure`` a variant publishes over plain channels to a second agent
started with ``security.insecure`` (the default is CURVE), and ``curve_vs_insecure=<sentinel/insecure>``
says what authentication costs the step.
Prints the median step time of each and its ratio to bare; the last line is
``overhead_ratio=<sentinel/bare>`` (the tiny GPT).

On a GPU: ``--device cuda`` trains every variant there (batches copied from pinned memory, the
step timed up to ``torch.cuda.synchronize()``), ``--dtype bfloat16`` runs forward and loss under
bf16 autocast (parameters, gradients and Adam's state stay float32, the usual mixed-precision
recipe), and ``--n-layer/--n-embd/--n-head/--block-size/--vocab-size`` change the model's shape
(``--gpt 350m``: 24 layers, width 1024, 16 heads, context 1024, a 32,768 vocabulary, 370M
parameters).  ``--syncs N`` then counts the host synchronisations of N more steps of bare,
sentinel (and probes), without the timing's synchronize (benchmarks/host_syncs.py):
``host_syncs_per_step_<variant>=`` (PyTorch's sync debug mode) and
``host_blocking_calls_per_step_<variant>=`` (profiler: cuda{Stream,Device,Event}Synchronize).
benchmarks/gpu_check.sh runs it this way.

    python benchmarks/overhead.py [--rounds 6] [--steps 25] [--threads 2] [--probes 10] [--grad-hooks] [--breakdown]
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --gpt 350m --batch-size 8 --probes 10 --syncs 20
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentinel  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402
from benchmarks.host_syncs import count_host_syncs, format_counts  # noqa: E402
from examples.tiny_gpt import GPT, GPTConfig, TrainConfig, make_run  # noqa: E402


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


CPU = torch.device("cpu")
GPT_350M = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "block_size": 1024, "vocab_size": 32768}


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 (or fp16) autocast for the forward pass; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Variant:
    def __init__(
        self,
        name: str,
        tc: TrainConfig,
        endpoint: str,
        probes_every: int = 10,
        gpt: GPTConfig | None = None,
        device: torch.device = CPU,
        dtype: torch.dtype = torch.float32,
    ):
        self.name = name
        self.device, self.dtype = device, dtype
        self.model, self.optimizer, self.schedule, loader = make_run(tc, gpt or GPTConfig())
        self.model.to(device)  # the same Parameter objects: the optimizer (no state yet) follows
        self.batches = iter(loader)
        self.times: list[float] = []
        self.sn = None
        self.cb = None
        if name == "sentinel":
            run = "overhead" if gpt is None else "overhead-2x128"
            self.sn = sentinel.attach(self.model, self.optimizer, run=run, publish={"endpoint": endpoint})
        elif name == "insecure":  # the same, on plain channels to an agent started with security.insecure
            self.sn = sentinel.attach(self.model, self.optimizer, run="overhead-insecure",
                                      publish={"endpoint": endpoint, "insecure": True}, control={"insecure": True})  # fmt: skip
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

    def step(self) -> None:
        x, y = next(self.batches)
        if self.device.type == "cuda":  # from pinned memory, so the copy does not wait for the GPU
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        with autocast(self.device, self.dtype):
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

    def run(self, steps: int, warmup: int = 2) -> None:
        cuda = self.device.type == "cuda"
        for i in range(steps):
            start = time.perf_counter()
            self.step()
            if cuda:
                torch.cuda.synchronize()  # the step's time is the GPU's, not its launch time
            if i >= warmup:
                self.times.append(time.perf_counter() - start)


def probe_step_cost(
    every: int,
    reps: int = 20,
    gpt: GPTConfig | None = None,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 24,
) -> tuple[float, int]:
    """(sampled-step forward+backward time / plain, hooks registered on an unsampled step)."""
    from sentinel.probes import Probes
    from sentinel.roles import assign_roles

    tc = TrainConfig(steps=1, batch_size=batch_size)
    model, _, _, loader = make_run(tc, gpt or GPTConfig())
    model.to(device)
    x, y = (t.to(device) for t in next(iter(loader)))
    probes = Probes(model, assign_roles(model), every=every)

    def timed(step: int) -> float:
        probes.begin_step(step)
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, y)[1]
        loss.backward()
        probes.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
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


def count_syncs(variants: list[Variant], steps: int) -> dict[str, dict[str, float]]:
    """Host synchronisations per step of each variant (benchmarks/host_syncs.py); empty off CUDA."""
    if not variants or variants[0].device.type != "cuda":
        print("syncs: not counted (not on a CUDA device)", file=sys.stderr)
        return {}
    half = max(1, steps // 2)  # one half for each counting method

    def counts(v: Variant) -> dict[str, float]:
        v.step()  # warm: the first step after the timing rounds
        return count_host_syncs(v.step, half)

    return {v.name: counts(v) for v in variants}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="also train with plain channels to a second agent (security.insecure): curve_vs_insecure=<sentinel/that>",
    )
    parser.add_argument("--device", default="cpu", help="where every variant trains: cpu (default), cuda, cuda:1...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="forward pass under autocast to this dtype (parameters and Adam's state stay float32)",
    )
    parser.add_argument("--gpt", choices=("tiny", "350m"), default="tiny", help="model shape preset (default: tiny)")
    for dim in ("n-layer", "n-embd", "n-head", "block-size", "vocab-size"):
        parser.add_argument(f"--{dim}", type=int, default=None, help=f"override the preset's {dim.replace('-', '_')}")
    parser.add_argument(
        "--syncs", type=int, default=0, metavar="N", help="CUDA: count host synchronisations over N more steps"
    )
    return parser.parse_args(argv)


def gpt_config(args: argparse.Namespace) -> GPTConfig:
    """The model shape: the preset, then any --n-layer ... overrides."""
    shape = dict(GPT_350M) if args.gpt == "350m" else {}
    for dim in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
        if getattr(args, dim) is not None:
            shape[dim] = getattr(args, dim)
    return GPTConfig(**shape)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")

    tc = TrainConfig(steps=args.rounds * args.steps + args.syncs + 10, batch_size=args.batch_size)
    gpt = gpt_config(args)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(gpt).parameters())
    where = "" if device.type == "cpu" and dtype == torch.float32 else f", {device}, {args.dtype} autocast"
    print(
        f"{'tiny GPT' if gpt == GPTConfig() else 'GPT'}: {gpt.n_layer} layers, d={gpt.n_embd}, {gpt.n_head} heads, "
        f"context {gpt.block_size}, batch {tc.batch_size}, {n_params / 1e6:.2f}M parameters, AdamW, "
        f"{args.threads} threads{where}"
    )
    with AgentProcess() as agent, contextlib.ExitStack() as stack:
        names = ("bare", "sentinel", "callback") + (("probes",) if args.probes else ())
        variants = [Variant(name, tc, agent.stats_endpoint, args.probes, gpt, device, dtype) for name in names]
        if args.insecure:
            plain = stack.enter_context(AgentProcess(config={"security": {"insecure": True}}))
            variants.append(Variant("insecure", tc, plain.stats_endpoint, gpt=gpt, device=device, dtype=dtype))
        variants += [
            Variant(f"{name}-2x128", tc, agent.stats_endpoint, gpt=SECOND_SHAPE, device=device, dtype=dtype)
            for name in ("bare", "sentinel")
        ]
        n = len(variants)
        for r in range(args.rounds):
            for v in variants[r % n :] + variants[: r % n]:
                v.run(args.steps)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        syncs = {}
        if args.syncs:
            syncs = count_syncs([v for v in variants if v.name in ("bare", "sentinel", "probes")], args.syncs)
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
    if args.insecure:
        print(f"curve_vs_insecure={ratios['sentinel'] / ratios['insecure']:.3f}")
    print(f"overhead_ratio_2x128={small:.3f}")
    if args.probes:
        assert "sentinel_layer_attention_logit_max" in received, "the agent never exported the probe statistics"
        print(f"probes_ratio={mean_ratios['probes']:.3f}")
        print(f"probes_vs_sentinel={mean_ratios['probes'] / mean_ratios['sentinel']:.3f}")
        step_ratio, hooks = probe_step_cost(
            args.probes, gpt=gpt, device=device, dtype=dtype, batch_size=args.batch_size
        )
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
    for name, counts in syncs.items():
        print(format_counts(name, counts))
        for key, label in (("sync_debug", "host_syncs"), ("blocking_calls", "host_blocking_calls")):
            if key in counts:
                print(f"{label}_per_step_{name}={counts[key]:.2f}")
    print(f"overhead_ratio={ratios['sentinel']:.3f}")


if __name__ == "__main__":
    main()
