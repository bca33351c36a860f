"""In-process cost per message of the agent's history, predictors and recording.

The same 1,000-tensor messages as benchmarks/agent_throughput.py (the full statistic set,
values drifting slowly like a healthy run) go through ``History.push``, ``SeriesPredictor.observe``
and ``StatsRecorder.record`` directly, without ZeroMQ or HTTP, so each part's time per message
is measured alone.  With ``--profile`` the predictors run under cProfile and the top functions
are printed.

    python benchmarks/predict_cost.py [--messages 400] [--tensors 1000] [--profile] [--every-steps N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import protocol  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.history import History  # noqa: E402
from agent.predict import SeriesPredictor  # noqa: E402
from agent.recording import StatsRecorder  # noqa: E402

STATS = ("grad_l2", "grad_rms", "param_l2", "update_l2", "update_ratio", "sqrt_v_rms", "sqrt_v_below_eps_fraction")
SCALARS = ("loss", "grad_norm", "lr", "step_duration_seconds")


def messages(count: int, tensors: int, first_step: int = 1, seed: int = 0) -> list[protocol.StatsMessage]:
    """Messages like benchmarks/agent_throughput.py's Firehose sends (16 drifting variants, cycled)."""
    layout = protocol.Layout(SCALARS, STATS, tuple(f"blocks.{i // 8}.w{i % 8}" for i in range(tensors)))
    rng = np.random.default_rng(seed)
    base = np.abs(rng.normal(1.0, 0.1, size=(tensors, len(STATS))))
    base[:, STATS.index("update_ratio")] = 1e-3
    base[:, STATS.index("sqrt_v_rms")] = 1e-3
    base[:, STATS.index("sqrt_v_below_eps_fraction")] = 0.0
    variants = [(base * (1 + 1e-3 * k)).astype(protocol.DTYPE) for k in range(16)]
    out = []
    for i in range(count):
        step = first_step + i
        k = step % 16
        scalars = np.array([3.0 - 1e-3 * k, 1.0, 3e-4, 0.1], dtype=protocol.DTYPE)
        out.append(protocol.StatsMessage("bench", 0, step, time.time(), i + 1, i + 1, 0, layout, scalars, variants[k]))
    return out


def measure(count: int, tensors: int, profile: bool = False, every_steps: int | None = None) -> dict[str, float]:
    cfg = AgentConfig()
    if every_steps is not None:
        cfg.predict.trend.every_steps = every_steps
    history = History.from_config(cfg)
    pred = SeriesPredictor("bench", 0, cfg.predict)
    warm = cfg.predict.trend.warmup_steps + cfg.predict.trend.window_steps
    msgs = messages(warm + count, tensors)
    times = {"history": 0.0, "predict": 0.0, "record": 0.0}
    profiler = cProfile.Profile() if profile else None
    with tempfile.TemporaryDirectory() as tmp:
        recorder = StatsRecorder(tmp, max_file_bytes=1 << 40, max_files=4)
        for i, msg in enumerate(msgs):
            timed = i >= warm  # past the trend warm-up, with full windows: the steady state
            t0 = time.perf_counter()
            series = history.push(msg, time.time()).series
            t1 = time.perf_counter()
            if profiler is not None and timed:
                profiler.enable()
            pred.observe(msg, series)
            if profiler is not None and timed:
                profiler.disable()
            t2 = time.perf_counter()
            recorder.record(msg, time.time())
            t3 = time.perf_counter()
            if timed:
                times["history"] += t1 - t0
                times["predict"] += t2 - t1
                times["record"] += t3 - t2
        recorder.close()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return {k: 1000 * v / count for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400, help="timed messages, after the warm-up (default 400)")
    parser.add_argument("--tensors", type=int, default=1000, help="tensors per message (default 1000)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the predictors")
    parser.add_argument(
        "--every-steps", type=int, default=None, help="predict.trend.every_steps (default: the agent's default)"
    )
    args = parser.parse_args(argv)
    r = measure(args.messages, args.tensors, args.profile, args.every_steps)
    every = args.every_steps or AgentConfig().predict.trend.every_steps
    print(
        f"{args.tensors} tensors x {len(STATS)} statistics, {args.messages} messages after the trend warm-up, "
        f"quiet trend lines refitted every {every} step(s)"
    )
    for name, ms in r.items():
        print(f"  {name:8s} {ms:7.3f} ms/message")
    print(f"  total    {sum(r.values()):7.3f} ms/message")
    print(f"predict_ms_per_message={r['predict']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
