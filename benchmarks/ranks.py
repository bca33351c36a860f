"""N ranks publishing to one agent: does /metrics stay bounded, fast and fresh at scale?

A real ``sentinel-agent run`` child process (agent/spawn.py) with its default configuration, and
N simulated trainer ranks, each its own ZeroMQ PUSH socket over loopback TCP with the CURVE keys
a local trainer discovers, sending wire-format messages (agent/protocol.py) directly, as a
trainer with ``publish.ranks: all`` would, the worst case: every rank sends every step its
scalars and the whole per-tensor matrix (``--tensors`` x the eight statistics sentinel sends by
default), and rank 0 also the job-level aggregates (sentinel/rank_reduce.py).  No torch.

Each step, every rank sends one message, the last rank's last; then /metrics is polled until
that rank's step shows (``sentinel_training_step``): that wait, from its send, is the
publish -> /metrics latency of the step, queued behind the N - 1 messages before it.  Steps start
``--interval`` seconds apart (or as soon as the previous one is visible).  Measured:

  series          samples in the final /metrics text (what Prometheus stores per scrape);
  scrape_p99_ms   GET /metrics, every poll of the run and 20 more at the end, p99;
  latency_p99_ms  publish -> /metrics of the last rank of each step, p99;
  agent_rss_mib   the agent's peak resident memory (VmHWM).

Goals at ``--ranks 1024`` with the defaults (docs/distributed.md): <= 20,000 series, scrape p99
<= 500 ms, latency p99 <= 1 s, RSS <= 2 GiB; exit 1 if one is missed.  ``--quick``: 8 ranks, 32
tensors, 4 steps, a few seconds.  The last line is
``ranks=<N> series=<n> scrape_p99_ms=<ms> latency_p99_ms=<ms> agent_rss_mib=<m>``.

    python benchmarks/ranks.py [--ranks 1024] [--steps 5] [--tensors 150] [--interval 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq
import zmq.auth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import protocol  # noqa: E402
from agent.spawn import AgentProcess  # noqa: E402
from sentinel_contract.protocol import JOB_SCALARS  # noqa: E402

STATS = (
    "grad_l2",
    "grad_rms",
    "param_l2",
    "update_l2",
    "update_ratio",
    "sqrt_v_rms",
    "sqrt_v_below_eps_fraction",
    "adam_eps",
)
SCALARS = ("loss", "grad_norm", "grad_clip_factor", "adam_eps", "lr", "step_duration_seconds")
JOB = JOB_SCALARS
GOALS = {"series": 20_000, "scrape_p99_ms": 500.0, "latency_p99_ms": 1000.0, "agent_rss_mib": 2048.0}
RUN = "bench-ranks"


#: what Prometheus asks for by default (OpenMetrics first), so a scrape here costs what it costs Prometheus
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def fetch(url: str, timeout: float = 30.0) -> str:
    request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
        return (gzip.decompress(body) if response.headers.get("Content-Encoding") == "gzip" else body).decode()


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far: what a scrape costs, whatever else the machine runs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def received(url: str) -> int:
    return int(json.loads(fetch(url.rsplit("/", 1)[0] + "/api/status"))["agent"]["received_messages"])


def step_of(text: str, rank: int) -> int | None:
    """``sentinel_training_step{run=RUN,rank=<rank>}`` in a /metrics text, without a full parse."""
    want = f'rank="{rank}"'
    for line in text.splitlines():
        if line.startswith("sentinel_training_step{") and want in line and f'run="{RUN}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))  # "# EOF" too


class Ranks:
    """N trainer-like PUSH sockets with the keys a local trainer finds (the agent's own client keys)."""

    def __init__(self, endpoint: str, keys_dir: Path, n: int, tensors: int):
        server_public, _ = zmq.auth.load_certificate(keys_dir / "server.key")
        public, secret = zmq.auth.load_certificate(keys_dir / "client.key_secret")
        self.ctx = zmq.Context(io_threads=2)
        self.ctx.max_sockets = n + 16  # ZeroMQ's default is 1,023 sockets per context
        self.socks = []
        for _ in range(n):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_public
            s.connect(endpoint)
            self.socks.append(s)
        names = tuple(f"model.layers.{i // 7}.{m}.weight" for i, m in zip(range(tensors), ["q", "k", "v", "o", "up", "gate", "down"] * tensors))  # fmt: skip
        self.layouts = [protocol.Layout(SCALARS + JOB, STATS, names), protocol.Layout(SCALARS, STATS, names)]
        self.raw = [lay.encode() for lay in self.layouts]
        self.ids = [protocol.layout_id(r) for r in self.raw]
        rng = np.random.default_rng(0)
        self.matrix = np.abs(rng.normal(1.0, 0.1, size=(tensors, len(STATS)))).astype(protocol.DTYPE)
        self.sent = [0] * n

    def send(self, rank: int, step: int) -> None:
        kind = 0 if rank == 0 else 1
        scalars = [3.0 - 1e-3 * step + 1e-4 * rank, 1.0, 1.0, 1e-8, 3e-4, 0.5]
        if kind == 0:
            scalars += [2.9, 3.0, 3.1, 1.0, 0.0, 0.4, 0.45, 0.5, 1.0, 0.0, 0.0]
        self.sent[rank] += 1
        header = protocol.encode_header(run=RUN, rank=rank, step=step, time=time.time(), seq=self.sent[rank],
                                        sent=self.sent[rank], dropped=0, layout=self.ids[kind])  # fmt: skip
        data = np.concatenate([np.asarray(scalars, dtype=protocol.DTYPE), (self.matrix * (1 + 1e-4 * step)).ravel()])
        self.socks[rank].send_multipart([header, self.raw[kind], data.tobytes()])

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.ctx.term()


def run(n: int, steps: int, tensors: int, interval: float, config: dict | None = None) -> dict:
    os.environ.setdefault("SENTINEL_DISCOVERY_DIR", tempfile.mkdtemp(prefix="sentinel-discovery-"))
    with AgentProcess(config=config) as agent:
        url = agent.metrics_url
        ranks = Ranks(agent.stats_endpoint, agent.workdir / "sentinel-agent-state" / "keys", n, tensors)
        scrapes: list[float] = []
        latencies: list[float] = []

        def scrape() -> str:
            t0 = time.perf_counter()
            text = fetch(url)
            scrapes.append((time.perf_counter() - t0) * 1000)
            return text

        try:
            for r in range(n):  # step 0: queued until each socket's CURVE handshake is done
                ranks.send(r, 0)
            deadline = time.monotonic() + 120
            while received(url) < n:  # every rank connected and its series made
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {received(url)} of {n} ranks reached the agent in 120 s")
                time.sleep(0.05)
            for step in range(1, steps + 1):
                start = time.perf_counter()
                for r in range(n):
                    ranks.send(r, step)
                sent_at = time.perf_counter()
                while step_of(scrape(), n - 1) != step:
                    if time.perf_counter() - sent_at > 60:
                        raise RuntimeError(f"step {step} of rank {n - 1} not at /metrics after 60 s")
                    time.sleep(0.02)
                latencies.append((time.perf_counter() - sent_at) * 1000)
                time.sleep(max(0.0, interval - (time.perf_counter() - start)))
            cpu, target = cpu_seconds(agent.pid), received(url) + n
            for r in range(n):  # one more step, not polled: the agent's CPU per message taken
                ranks.send(r, steps + 1)
            while received(url) < target:
                time.sleep(0.05)
            ingest_cpu = (cpu_seconds(agent.pid) - cpu) / n
            idle = len(scrapes)
            cpu = cpu_seconds(agent.pid)
            for _ in range(20):
                text = scrape()
            cpu = (cpu_seconds(agent.pid) - cpu) / 20
            return {
                "ranks": n,
                "tensors": tensors,
                "steps": steps,
                "series": series_count(text),
                "scrape_bytes": len(text),
                "scrape_p50_ms": float(np.percentile(scrapes, 50)),
                "scrape_p99_ms": float(np.percentile(scrapes, 99)),
                "idle_scrape_p50_ms": float(np.percentile(scrapes[idle:], 50)),
                "scrape_cpu_ms": cpu * 1000,
                "ingest_cpu_us": ingest_cpu * 1e6,
                "latency_p50_ms": float(np.percentile(latencies, 50)),
                "latency_p99_ms": float(np.percentile(latencies, 99)),
                "agent_rss_mib": peak_rss_mib(agent.pid),
                "received": received(url),
            }
        finally:
            ranks.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=1024, help="simulated ranks (default 1024)")
    parser.add_argument("--steps", type=int, default=5, help="steps every rank publishes (default 5)")
    parser.add_argument("--tensors", type=int, default=150, help="tensors per message (default 150, a GPT-2)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between step starts (default 1)")
    parser.add_argument("--quick", action="store_true", help="8 ranks, 32 tensors, 4 steps (the test suite's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.tensors, args.steps, args.interval = 8, 32, 4, 0.2
    r = run(args.ranks, args.steps, args.tensors, args.interval)
    print(
        f"{r['ranks']} ranks x {r['steps']} steps (+ step 0), each message {r['tensors']} tensors x {len(STATS)} "
        f"statistics + {len(SCALARS)} scalars (rank 0: + {len(JOB)} job-level); agent defaults"
    )
    print(f"/metrics: {r['series']} series, {r['scrape_bytes'] / 1024:.0f} KiB")
    print(
        f"scrape: p50 {r['scrape_p50_ms']:.1f} ms, p99 {r['scrape_p99_ms']:.1f} ms; with no messages arriving: "
        f"p50 {r['idle_scrape_p50_ms']:.1f} ms, {r['scrape_cpu_ms']:.0f} ms of agent CPU each (load-independent)"
    )
    print(
        f"publish -> /metrics (last rank of a step): p50 {r['latency_p50_ms']:.0f} ms, p99 {r['latency_p99_ms']:.0f} ms"
    )
    print(
        f"agent CPU: {r['ingest_cpu_us']:.0f} µs per message taken; so on a core of its own a step of all ranks "
        f"would be at /metrics after about {(r['ranks'] * r['ingest_cpu_us'] / 1000 + r['scrape_cpu_ms']):.0f} ms"
    )
    print(f"agent peak RSS: {r['agent_rss_mib']:.0f} MiB; messages received: {r['received']}")
    misses = [k for k, goal in GOALS.items() if r[k] > goal]
    print("goals: " + ("all met" if not misses else "MISSED " + ", ".join(misses)))
    print(
        f"ranks={r['ranks']} series={r['series']} scrape_p99_ms={r['scrape_p99_ms']:.0f} "
        f"latency_p99_ms={r['latency_p99_ms']:.0f} agent_rss_mib={r['agent_rss_mib']:.0f}"
    )
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
