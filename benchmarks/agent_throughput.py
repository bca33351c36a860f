"""Ingest rate, end-to-end latency, scrape time and memory of a running agent under a firehose.

A real ``sentinel-agent run`` child process (agent/spawn.py) with its default configuration
(predictors, policy, recording on) receives messages for 1,000 tensors x the full statistic
set (grad_l2, grad_rms, param_l2, update_l2, update_ratio, sqrt_v_rms,
sqrt_v_below_eps_fraction) plus the usual scalars, pushed as fast as one blocking ZeroMQ PUSH
socket can (no drops: the sender waits when the agent's queue is full, so the rate measured is
the agent's).  Values drift slowly, like a healthy run, so no decision fires and the trend
lines are refitted every ``predict.trend.every_steps`` steps (docs/policy.md, "When the lines are
refitted"); ``--every-steps 1`` refits them on every message.

Measured:
  ingest     messages/s from the first send until /metrics counts them all;
  latency    publish -> the step visible as ``sentinel_training_step`` at /metrics, one
             message at a time (polling /metrics; each poll's own time is part of it), p50/p99;
  scrape     time of GET /metrics with the 1,000-tensor series present, p50/p99;
  memory     the agent's RSS at checkpoints through the run (flat = bounded history).
Goals: >= 2,000 messages/s, latency p99 <= 50 ms, scrape <= 200 ms, flat memory.  Exit 1 if
one is missed.  The last line is ``agent_msgs_per_s=<n>``.

    python benchmarks/agent_throughput.py [--messages 5000] [--tensors 1000] [--ranks 1] [--latency-samples 100]
                                          [--every-steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import protocol  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402

STATS = ("grad_l2", "grad_rms", "param_l2", "update_l2", "update_ratio", "sqrt_v_rms", "sqrt_v_below_eps_fraction")
SCALARS = ("loss", "grad_norm", "lr", "step_duration_seconds")
IN_FLIGHT = 500
GOALS = {"msgs_per_s": 2000.0, "latency_p99_ms": 50.0, "scrape_p99_ms": 200.0, "rss_growth_mib": 32.0}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample_value(text: str, name: str, run: str, rank: int = 0) -> float | None:
    """The value of ``name{run="<run>",rank="<rank>"}`` in a /metrics text, read without a full parse."""
    prefix = name + "{"
    for line in text.splitlines():
        if line.startswith(prefix) and f'run="{run}"' in line and f'rank="{rank}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def wait(condition, what: str, timeout: float = 600.0) -> None:
    """Poll ``condition`` every millisecond: back-to-back HTTP polls would take the agent's CPU (and
    its interpreter lock) away from the very work being measured."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


def wait_received(url: str, target: int, rate: float) -> None:
    """Wait until the agent has taken ``target`` messages, polling /api/status about twice per
    expected wait (``rate`` messages/s so far): each poll costs the agent a couple of milliseconds."""
    deadline = time.monotonic() + 600.0
    while (n := received(url)) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for the agent to take {target} messages (it has {n:.0f})")
        time.sleep(min(0.05, max(0.001, (target - n) / rate / 2)))


class Firehose:
    """A trainer-like PUSH socket that never drops: sends block while the agent's queue is full."""

    def __init__(self, endpoint: str, run: str, tensors: int, ranks: int = 1, seed: int = 0):
        self.run, self.ranks = run, ranks
        self.layout = protocol.Layout(SCALARS, STATS, tuple(f"blocks.{i // 8}.w{i % 8}" for i in range(tensors)))
        self.raw = self.layout.encode()
        self.lid = protocol.layout_id(self.raw)
        rng = np.random.default_rng(seed)
        base = np.abs(rng.normal(1.0, 0.1, size=(tensors, len(STATS))))
        base[:, STATS.index("update_ratio")] = 1e-3
        base[:, STATS.index("sqrt_v_rms")] = 1e-3
        base[:, STATS.index("sqrt_v_below_eps_fraction")] = 0.0
        self.frames = [  # a few slowly drifting variants, cycled: encoding cost stays out of the measurement
            np.concatenate([[3.0 - 1e-3 * k, 1.0, 3e-4, 0.1], (base * (1 + 1e-3 * k)).ravel()]).astype(protocol.DTYPE)
            for k in range(16)
        ]
        self.data = [f.tobytes() for f in self.frames]
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(endpoint)
        self.step = 0
        self.sent = 0

    def send(self, rank: int | None = None) -> None:
        """Send the next message: ranks take turns, each rank's step advancing once per round."""
        rank = self.sent % self.ranks if rank is None else rank
        if rank == 0:
            self.step += 1
        self.sent += 1
        header = protocol.encode_header(
            run=self.run, rank=rank, step=self.step, time=time.time(), seq=self.sent, sent=self.sent, dropped=0,
            layout=self.lid,
        )  # fmt: skip
        self.sock.send_multipart([header, self.raw, self.data[self.step % len(self.data)]])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def received(url: str) -> float:
    """Messages the agent has taken, from /api/status (a few ms, whatever the size of /metrics)."""
    status = json.loads(fetch(url.rsplit("/", 1)[0] + "/api/status"))
    return float(status["agent"]["received_messages"])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(
    messages: int, tensors: int, latency_samples: int, ranks: int = 1, checkpoints: int = 10, config: dict | None = None
) -> dict:
    out: dict = {"messages": messages, "tensors": tensors, "ranks": ranks}
    with AgentProcess(config=config) as agent:
        url = agent.metrics_url
        hose = Firehose(agent.stats_endpoint, "bench", tensors, ranks)
        try:
            rss: list[tuple[int, int]] = [(0, rss_bytes(agent.pid))]
            hose.send()  # connect and warm up (first layout decode, first series)
            wait(lambda: received(url) >= 1, "the first message")
            every = max(1, messages // checkpoints)
            chunk = min(IN_FLIGHT, every)
            start = time.perf_counter()
            for i in range(1, messages + 1):
                hose.send()
                if i % chunk == 0:  # at most two chunks queued, so that RSS is the agent's own memory
                    wait_received(url, i + 1 - chunk, rate=max(100.0, i / (time.perf_counter() - start)))
                if i % every == 0:
                    rss.append((i, rss_bytes(agent.pid)))
            wait_received(url, messages + 1, rate=max(100.0, messages / (time.perf_counter() - start)))
            ingest_s = time.perf_counter() - start
            rss.append((messages, rss_bytes(agent.pid)))
            out.update(ingest_s=ingest_s, msgs_per_s=messages / ingest_s, rss=rss)

            latencies = []
            for _ in range(latency_samples):
                sent_at = time.perf_counter()
                step = hose.step + 1
                hose.send(rank=0)
                wait(lambda: sample_value(fetch(url), "sentinel_training_step", "bench") == step, "a step", 30)  # noqa: B023
                latencies.append((time.perf_counter() - sent_at) * 1000)
                time.sleep(0.01)
            out.update(latency_p50_ms=percentile(latencies, 50), latency_p99_ms=percentile(latencies, 99))

            scrapes, sizes = [], []
            for _ in range(30):
                t0 = time.perf_counter()
                sizes.append(len(fetch(url)))
                scrapes.append((time.perf_counter() - t0) * 1000)
            out.update(
                scrape_p50_ms=statistics.median(scrapes), scrape_p99_ms=percentile(scrapes, 99), scrape_bytes=sizes[-1]
            )
            out["rss_end"] = rss_bytes(agent.pid)
        finally:
            hose.close()
    warm = out["rss"][len(out["rss"]) // 3][1]  # a third in: the history rings have filled (history.steps)
    out["rss_growth_mib"] = (out["rss"][-1][1] - warm) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages in the ingest run (default 5000)")
    parser.add_argument("--tensors", type=int, default=1000, help="tensors per message (default 1000)")
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="ranks of the run taking turns (publish.ranks: all); the agent analyses rank 0 only "
        "(predict.ranks: zero), so with 1 (default) every message goes through the predictors",
    )
    parser.add_argument("--latency-samples", type=int, default=100, help="single-message latency samples")
    parser.add_argument(
        "--every-steps",
        type=int,
        default=None,
        help="the agent's predict.trend.every_steps (default: the agent's default); 1 refits the trend "
        "lines on every message",
    )
    args = parser.parse_args(argv)
    config = None if args.every_steps is None else {"predict": {"trend": {"every_steps": args.every_steps}}}
    r = run(args.messages, args.tensors, args.latency_samples, args.ranks, config=config)
    size = len(protocol.Layout(SCALARS, STATS, ("x",) * args.tensors).encode())
    print(
        f"messages: {r['messages']} x ({r['tensors']} tensors x {len(STATS)} statistics + {len(SCALARS)} scalars), "
        f"from {r['ranks']} rank(s) taking turns; rank 0 goes through the predictors and the recording"
    )
    every = AgentConfig().predict.trend.every_steps if args.every_steps is None else args.every_steps
    print(f"  trend lines refitted every {every} step(s) while quiet (predict.trend.every_steps)")
    print(
        f"  about {(len(SCALARS) + len(STATS) * args.tensors) * 4 / 1024:.0f} KiB of data + {size / 1024:.0f} KiB layout"
    )
    print(f"ingest: {r['msgs_per_s']:,.0f} messages/s ({r['ingest_s']:.1f} s, at most {2 * IN_FLIGHT} queued)")
    print(f"latency publish -> /metrics: p50 {r['latency_p50_ms']:.1f} ms, p99 {r['latency_p99_ms']:.1f} ms")
    print(
        f"scrape /metrics: p50 {r['scrape_p50_ms']:.1f} ms, p99 {r['scrape_p99_ms']:.1f} ms "
        f"({r['scrape_bytes'] / 1024:.0f} KiB)"
    )
    print("agent RSS by messages ingested: " + ", ".join(f"{n}: {b / 2**20:.0f} MiB" for n, b in r["rss"]))
    print(f"  growth after the history filled: {r['rss_growth_mib']:+.1f} MiB")
    misses = [
        name
        for name, ok in (
            ("messages/s", r["msgs_per_s"] >= GOALS["msgs_per_s"]),
            ("latency p99", r["latency_p99_ms"] <= GOALS["latency_p99_ms"]),
            ("scrape p99", r["scrape_p99_ms"] <= GOALS["scrape_p99_ms"]),
            ("flat memory", r["rss_growth_mib"] <= GOALS["rss_growth_mib"]),
        )
        if not ok
    ]
    print("goals: " + ("all met" if not misses else "MISSED " + ", ".join(misses)))
    print(f"agent_msgs_per_s={r['msgs_per_s']:.0f}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
