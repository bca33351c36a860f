"""Fuzz the agent's statistics decoder and both ends of the command channel with mutated frames.

A seeded mutation fuzzer starts from valid messages and damages them: bit flips, truncation,
extension, frame reordering, dropped, duplicated and extra frames, header and layout fields
replaced by random JSON (NaN, Infinity, huge integers, deep nesting, lone surrogates), huge
lengths, invalid UTF-8 and plain noise.  Every case travels through the real code path:

* statistics: a ZeroMQ PUSH socket into the agent's ``Receiver`` (its own frame reading,
  ``protocol.decode``, the history, the rejection counters), inproc;
* agent side of the command channel: a DEALER into the agent's ``CommandServer`` ROUTER
  (frame handling, ``commands.decode`` of hello and ack, unknown ids), inproc;
* trainer side: a ROUTER on loopback TCP sending to the trainer's ``ControlClient`` (its
  ``receive``: ``commands.decode`` of commands and the answer to an invalid one).

Each case is also decoded by the fuzzer itself to predict its outcome.  The run fails (exit
1) if anything raises other than the documented rejections (``ProtocolError`` with a reason in
``protocol.REJECT_REASONS``, ``CommandError`` with a reason in the command server's
``REJECT_REASONS``), if the agent's counters by reason differ from the prediction, or if
traced memory (tracemalloc) keeps growing after warm-up.  Prints cases/s and the outcomes by
reason; the last line is ``fuzz_cases_per_s=<n>``.

    python benchmarks/fuzz.py [--cases 100000] [--seed 0] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import command_server, protocol  # noqa: E402
from agent.command_server import CommandServer  # noqa: E402
from agent.commands import MAX_MESSAGE_BYTES, Ack, Command, CommandError, Hello, decode  # noqa: E402
from agent.config import CommandsConfig, load_config  # noqa: E402
from agent.events import EventLog  # noqa: E402
from agent.protocol import ProtocolError  # noqa: E402
from agent.receive import Receiver  # noqa: E402
from agent.state import AgentState  # noqa: E402
from sentinel.control import ControlClient  # noqa: E402

STATS_MAX_BYTES = 256 * 1024
STATS = ("grad_l2", "grad_rms", "param_l2", "update_l2", "update_ratio", "sqrt_v_rms", "sqrt_v_below_eps_fraction")
SCALARS = ("loss", "grad_norm", "lr", "step_duration_seconds")
BATCH = 200
CRASH_LOG = "unexpected error while handling a message"


class FuzzFailure(AssertionError):
    """A case raised something undocumented, or the agent's counters disagree with the prediction."""


# ---- random values ------------------------------------------------------------------------------


_POOLS = (
    "abcxyz_.0123456789",
    "ßé中文层🙂\u200b\u202e",
    '\x00\x01\x1f\x7f\n\t"\\',
    "\ud800\udfff",  # lone surrogates: valid in JSON escapes, not encodable as UTF-8
)
_rng0 = random.Random(1234)
_TEXT = "".join(_rng0.choice(_rng0.choices(_POOLS, weights=(8, 3, 2, 1))[0]) for _ in range(8192))
_PLAIN = "".join(_rng0.choice(_POOLS[0]) for _ in range(8192))


def random_text(rng: random.Random, max_len: int = 40) -> str:
    """Mostly plain, sometimes unicode, control characters or lone surrogates; lengths at the edges too."""
    n = rng.choice((0, 1, 2, rng.randint(0, max_len), max_len))
    source = _PLAIN if rng.random() < 0.5 else _TEXT
    i = rng.randrange(len(source) - n)
    return source[i : i + n]


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice((0, 1, -1, 7, 2**31, 2**63 - 1, 2**63, -(2**63), 2**100, rng.randint(-(10**6), 10**6)))
    if kind == 3:
        return rng.choice((math.nan, math.inf, -math.inf, 0.5, -0.0, 1e308, 5e-324, rng.uniform(-1e6, 1e6)))
    if kind in (4, 5, 6):
        return random_text(rng)
    if kind in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {random_text(rng, 8): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def dumps(obj: object) -> bytes:
    """JSON as a careless or hostile peer might write it: NaN/Infinity tokens, \\uXXXX escapes."""
    return json.dumps(obj, allow_nan=True).encode()


def noise(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def deep(rng: random.Random) -> bytes:
    n = rng.choice((100, 5000, 50_000))  # at most 300 kB: under the agent's ZMQ_MAXMSGSIZE
    return b"[" * n + b"]" * rng.choice((0, n)) if rng.random() < 0.5 else b'{"a":' * n + b"1" + b"}" * n


def bitflip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    """One byte-level mutation: flip, truncate, extend, splice, or invalid UTF-8."""
    kind = rng.randrange(6)
    if kind == 0:
        return bitflip(rng, data)
    if kind == 1:
        return data[: rng.randint(0, len(data))]
    if kind == 2:
        return data + noise(rng, rng.randint(1, 64))
    if kind == 3:
        i = rng.randint(0, len(data))
        return data[:i] + rng.choice((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00")) + data[i:]
    if kind == 4:
        return b""
    i, j = sorted(rng.randint(0, len(data)) for _ in range(2))
    return data[:i] + data[j:]


def damage_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One frame-level mutation: reorder, drop, duplicate, add noise frames."""
    frames = list(frames)
    kind = rng.randrange(4)
    if kind == 0:
        rng.shuffle(frames)
    elif kind == 1 and len(frames) > 1:
        frames.pop(rng.randrange(len(frames)))
    elif kind == 2:
        frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
    else:
        frames += [noise(rng, rng.randint(0, 32)) for _ in range(rng.randint(1, 4))]
    return frames


# ---- statistics messages --------------------------------------------------------------------------


def stats_frames(
    rng: random.Random, layout: protocol.Layout, *, run: str = "run", rank: int = 0, step: int = 0
) -> list[bytes]:
    raw = layout.encode()
    values = np.frombuffer(rng.randbytes(layout.size * 4), dtype=protocol.DTYPE).copy()  # any float32, NaN too
    if values.size and rng.random() < 0.2:
        values[rng.randrange(values.size)] = rng.choice((np.nan, np.inf, -np.inf))
    header = protocol.encode_header(
        run=run, rank=rank, step=step, time=time.time(), seq=step + 1, sent=step + 1, dropped=0,
        layout=protocol.layout_id(raw),
    )  # fmt: skip
    return [header, raw, values.tobytes()]


def base_layouts(rng: random.Random) -> list[protocol.Layout]:
    return [
        protocol.Layout(SCALARS, STATS, tuple(f"blocks.{i}.w" for i in range(12))),
        protocol.Layout(("loss",), (), ()),
        protocol.Layout((), ("out_rms", "attn_logit_max"), ("blocks.0.attn", "blocks.1.attn")),
        protocol.Layout(("lösß", "🙂"), ("grad_l2",), ("层.0", "x" * protocol.MAX_NAME)),
        protocol.Layout(
            ("loss",), ("grad_l2",), ("h.0.attn.qkv.weight", "h.0.ln1.weight", "h.0.x"), roles=("qkv", "norm", "")
        ),
    ]


def mutate_stats(rng: random.Random, layouts: list[protocol.Layout]) -> list[bytes]:
    """One fuzz case for the statistics channel (sometimes a valid message, to keep history busy)."""
    run = rng.choice(("run", "r2", random_text(rng, 20) or "x", "é" * protocol.MAX_RUN_NAME))
    frames = stats_frames(rng, rng.choice(layouts), run=run, rank=rng.randrange(4), step=rng.randrange(10**6))
    kind = rng.randrange(13)
    if kind == 0:
        return frames  # valid (unless the run name is not)
    if kind == 1:
        i = rng.randrange(3)
        frames[i] = damage_bytes(rng, frames[i])
        return frames
    if kind == 2:
        return damage_frames(rng, frames)
    if kind in (3, 4, 5):
        header = json.loads(frames[0])
        key = rng.choice([*header, random_text(rng, 6)])
        if rng.random() < 0.15:
            header.pop(key, None)
        else:
            header[key] = random_json(rng)
        frames[0] = dumps(header)
        return frames
    if kind in (6, 7):  # a new layout whose id matches, so that it gets parsed
        layout = json.loads(frames[1])
        key = rng.choice(("scalars", "stats", "tensors", "roles", random_text(rng, 6)))
        choice = rng.randrange(5)
        if choice == 0:
            layout[key] = random_json(rng)
        elif choice == 1:
            layout[key] = [random_text(rng, protocol.MAX_NAME + 2) for _ in range(rng.randint(0, 20))]
        elif choice == 2:
            layout[key] = ["dup", "dup"]
        elif choice == 3:
            layout[key] = [f"t{i}" for i in range(rng.choice((100, 1000, 1000, 5000)))]  # huge lengths
        else:
            layout = random_json(rng)
        raw = dumps(layout)
        frames[1] = raw
        frames[0] = dumps({**json.loads(frames[0]), "layout": protocol.layout_id(raw)})
        if rng.random() < 0.5 and isinstance(layout, dict):
            try:  # the data frame the layout asks for, as far as it can be known
                size = sum(len(layout[k]) for k in ("scalars",)) + len(layout["stats"]) * len(layout["tensors"])
                frames[2] = np.full(size, np.nan, dtype=protocol.DTYPE).tobytes()
            except (KeyError, TypeError):
                pass
        return frames
    if kind == 8:  # data frame of the wrong or a huge length
        n = rng.choice((0, 1, 3, len(frames[2]) + 4, STATS_MAX_BYTES + 1, 2 * STATS_MAX_BYTES))
        frames[2] = noise(rng, n) if n < 1024 else bytes([rng.randrange(256)]) * n
        return frames
    if kind == 9:
        frames[0] = dumps(random_json(rng)) if rng.random() < 0.7 else deep(rng)
        return frames
    if kind == 10:
        return [noise(rng, rng.randint(0, 300)) for _ in range(rng.randint(1, 5))]
    if kind == 11:  # huge strings in the header
        frames[0] = dumps(
            {**json.loads(frames[0]), rng.choice(("run", "kind", "layout")): "r" * rng.choice((129, 10**5))}
        )
        return frames
    frames[rng.randrange(3)] = frames[rng.randrange(3)]  # one frame in another's place
    return frames


# ---- command-channel messages -------------------------------------------------------------------


def valid_command_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return Hello(run=rng.choice(("run", "r2")), rank=0, step=rng.randrange(10**6)).encode()
    if kind == 1:
        status = rng.choice(("applied", "duplicate", "rejected", "unknown_run", "failed"))
        return Ack(id=f"c{rng.randrange(10**6)}", run="run", status=status, step=rng.randrange(100)).encode()
    action, args = rng.choice(
        (("warn", {}), ("skip_update", {"steps": 3}), ("skip_batches", {"n": 10}), ("stop", {}),
         ("rollback", {"steps_back": 5, "skip": 20}), ("lr_scale", {"factor": 0.5}))
    )  # fmt: skip
    return Command(id=f"c{rng.randrange(10**9)}", run="run", action=action, args=args, reason="fuzz").encode()


def mutate_command(rng: random.Random) -> bytes:
    """One fuzz frame for either end of the command channel."""
    raw = valid_command_frame(rng)
    kind = rng.randrange(8)
    if kind == 0:
        return raw
    if kind == 1:
        return damage_bytes(rng, raw)
    if kind in (2, 3, 4):
        obj = json.loads(raw)
        if kind == 4 and isinstance(obj.get("args"), dict):
            target = obj["args"]
            key = rng.choice([*target, "factor", "steps", random_text(rng, 6)])
        else:
            target = obj
            key = rng.choice([*obj, random_text(rng, 6)])
        if rng.random() < 0.15:
            target.pop(key, None)
        else:
            target[key] = random_json(rng)
        return dumps(obj)
    if kind == 5:
        return dumps(random_json(rng)) if rng.random() < 0.7 else deep(rng)
    if kind == 6:
        obj = json.loads(raw)
        obj[rng.choice(("run", "id", "reason", "detail"))] = "x" * rng.choice((65, 129, 1001, MAX_MESSAGE_BYTES))
        return dumps(obj)
    return noise(rng, rng.randint(0, 200))


# ---- targets ------------------------------------------------------------------------------------


class _CrashCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if CRASH_LOG in record.getMessage():
            self.records.append(record)


@dataclass
class Outcomes:
    name: str
    counts: Counter = field(default_factory=Counter)
    cases: int = 0
    seconds: float = 0.0


class StatsTarget:
    """The agent's Receiver behind a real PULL socket (inproc), and the fuzzer's own prediction."""

    def __init__(self, ctx: zmq.Context):
        cfg = load_config(
            {
                "limits": {"max_message_bytes": STATS_MAX_BYTES, "max_series": 16},
                "history": {"steps": 16, "max_matrix_bytes": 64 * 1024},
                "recording": {"enabled": False},
            }
        )
        cfg.stats_endpoint = f"inproc://fuzz-stats-{id(self)}"
        self.cfg = cfg
        self.state = AgentState(cfg)
        self.receiver = Receiver(self.state, cfg, context=ctx)
        self.receiver.bind()
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(cfg.stats_endpoint)
        self._layouts: dict[str, protocol.Layout] = {}
        self.out = Outcomes("statistics (agent Receiver)")
        self._pending = 0

    def predict(self, frames: list[bytes]) -> str:
        try:
            protocol.decode(frames, self._layouts, max_bytes=STATS_MAX_BYTES, max_layouts=self.cfg.limits.max_series)
        except ProtocolError as exc:
            if exc.reason not in protocol.REJECT_REASONS:
                raise FuzzFailure(f"undocumented reason {exc.reason!r}") from exc
            return exc.reason
        return "accepted"

    def feed(self, frames: list[bytes]) -> None:
        self.out.counts[self.predict(frames)] += 1
        self.out.cases += 1
        self.push.send_multipart(frames)
        self._pending += 1
        if self._pending >= BATCH:
            self.flush()

    def flush(self) -> None:
        deadline = time.monotonic() + 10
        while self.state.received_messages < self.out.cases:
            self.receiver._drain()
            if time.monotonic() > deadline:
                raise FuzzFailure(f"receiver took {self.state.received_messages} of {self.out.cases} messages")
        self._pending = 0

    def check(self) -> None:
        self.flush()
        snap = self.state.snapshot()
        got = {reason: n for reason, n in snap.rejected_messages.items() if n}
        want = {reason: n for reason, n in self.out.counts.items() if reason != "accepted"}
        if got != want:
            raise FuzzFailure(f"statistics rejections by reason: agent counted {got}, expected {want}")
        if snap.received_messages != self.out.cases:
            raise FuzzFailure(f"agent received {snap.received_messages} messages, sent {self.out.cases}")
        if len(snap.series) > self.cfg.limits.max_series:
            raise FuzzFailure(f"{len(snap.series)} series tracked > limits.max_series")

    def close(self) -> None:
        self.push.close(linger=0)
        self.receiver.stop()


class AgentCommandTarget:
    """The agent's CommandServer behind a real ROUTER socket (inproc), fed by a DEALER."""

    def __init__(self, ctx: zmq.Context, tmp: Path):
        cfg = CommandsConfig(endpoint=f"inproc://fuzz-commands-{id(self)}")
        self.server = CommandServer(cfg, EventLog(tmp / "events.jsonl"), context=ctx)
        self.server.bind()
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(cfg.endpoint)
        self.out = Outcomes("commands, agent side (hello/ack)")
        self.hellos = 0

    @staticmethod
    def predict(body: list[bytes]) -> str:
        while len(body) > 1 and body[0] == b"":
            body = body[1:]
        if len(body) != 1:
            return "frame_count"
        try:
            msg = decode(body[0])
        except CommandError as exc:
            if exc.reason not in command_server.REJECT_REASONS:
                raise FuzzFailure(f"undocumented command reason {exc.reason!r}") from exc
            return exc.reason
        if isinstance(msg, Hello):
            return "hello"
        return "unknown_id" if isinstance(msg, Ack) else "unexpected_type"

    def feed(self, frames: list[bytes]) -> None:
        self.out.counts[self.predict(frames)] += 1
        self.out.cases += 1
        self.dealer.send_multipart(frames)
        if self.out.cases % BATCH == 0:
            self.flush()

    def _handled(self) -> int:
        snap = self.server.snapshot()
        return sum(snap.rejected.values())

    def flush(self) -> None:
        want = self.out.cases - self.out.counts["hello"]
        deadline = time.monotonic() + 10
        while True:
            self.server._drain()
            if self._handled() >= want:
                return
            if time.monotonic() > deadline:
                raise FuzzFailure(f"command server handled {self._handled()} of {want} frames")

    def check(self) -> None:
        self.flush()
        self.server._drain()  # trailing hellos
        got = {reason: n for reason, n in self.server.snapshot().rejected.items() if n}
        want = {reason: n for reason, n in self.out.counts.items() if reason != "hello"}
        if got != want:
            raise FuzzFailure(f"command-channel rejections by reason: agent counted {got}, expected {want}")

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.server.stop()


class TrainerCommandTarget:
    """The trainer's ControlClient, receiving from a ROUTER on loopback TCP."""

    def __init__(self, ctx: zmq.Context):
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.client = ControlClient(f"tcp://127.0.0.1:{port}", "run", hello_interval=0.1, insecure=True)
        deadline = time.monotonic() + 10
        while not self.router.poll(20):  # IMMEDIATE: the hello goes out once connected
            self.client.hello(0, force=True)
            if time.monotonic() > deadline:
                raise FuzzFailure("the trainer's control client never connected")
        self.peer = self.router.recv_multipart()[0]
        self.out = Outcomes("commands, trainer side (command)")
        self.ignored = 0
        self.commands = 0

    @staticmethod
    def predict(raw: bytes) -> str:
        try:
            msg = decode(raw)
        except CommandError as exc:
            if exc.reason not in command_server.REJECT_REASONS:
                raise FuzzFailure(f"undocumented command reason {exc.reason!r}") from exc
            return exc.reason
        return "command" if isinstance(msg, Command) else "ignored"

    def feed(self, raw: bytes) -> None:
        if len(raw) > 2 * MAX_MESSAGE_BYTES:
            raw = raw[: 2 * MAX_MESSAGE_BYTES]  # the client's ZMQ_MAXMSGSIZE would drop the connection
        self.out.counts[self.predict(raw)] += 1
        self.out.cases += 1
        self.router.send_multipart([self.peer, raw])
        if self.out.cases % BATCH == 0:
            self.flush()

    def flush(self) -> None:
        want = self.out.cases - self.out.counts["ignored"]
        deadline = time.monotonic() + 10
        while self.client.received + self.client.invalid < want:
            self.commands += len(self.client.receive(limit=1000))
            while True:  # acks of invalid commands come back; drop them
                try:
                    self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            if time.monotonic() > deadline:
                raise FuzzFailure(f"trainer handled {self.client.received + self.client.invalid} of {want} frames")
            if self.client.received + self.client.invalid < want:
                self.client._sock.poll(10)

    def check(self) -> None:
        self.flush()
        invalid = self.out.cases - self.out.counts["command"] - self.out.counts["ignored"]
        if (self.client.received, self.client.invalid) != (self.out.counts["command"], invalid):
            raise FuzzFailure(
                f"trainer took {self.client.received} commands and {self.client.invalid} invalid, "
                f"expected {self.out.counts['command']} and {invalid}"
            )

    def close(self) -> None:
        self.client.close()
        self.router.close(linger=0)


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Report:
    outcomes: list[Outcomes]
    cases: int
    seconds: float
    memory: list[tuple[int, int, int]]  # (cases so far, traced bytes now, peak)
    crashes: list[str]

    @property
    def cases_per_s(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0


def run(
    cases: int,
    seed: int = 0,
    *,
    trace_memory: bool = True,
    checkpoints: int = 10,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run ``cases`` fuzz cases (half statistics, a quarter for each end of the command channel)."""
    rng = random.Random(seed)
    layouts = base_layouts(rng)
    agent_log = logging.getLogger("sentinel.agent")
    crash = _CrashCounter()
    agent_log.addHandler(crash)
    old_level, old_propagate = agent_log.level, agent_log.propagate
    agent_log.setLevel(logging.DEBUG)
    agent_log.propagate = False
    logging.getLogger("sentinel").setLevel(logging.CRITICAL)  # the trainer's warnings about invalid commands
    ctx = zmq.Context()
    memory: list[tuple[int, int, int]] = []
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sentinel-fuzz-") as tmp:
        stats, agent_cmd, trainer_cmd = StatsTarget(ctx), AgentCommandTarget(ctx, Path(tmp)), TrainerCommandTarget(ctx)
        if trace_memory:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            for i in range(cases):
                which = i % 4
                t0 = time.perf_counter()
                if which < 2:
                    target, case = stats, mutate_stats(rng, layouts)
                elif which == 2:
                    frame = mutate_command(rng)
                    target, case = agent_cmd, [frame] if rng.random() < 0.8 else damage_frames(rng, [frame])
                else:
                    target, case = trainer_cmd, mutate_command(rng)
                try:
                    target.feed(case)
                except FuzzFailure:
                    raise
                except Exception as exc:  # the prediction (the same decoder) raised: a crash
                    crashes.append(f"{target.out.name}: {exc!r} on {repr(case)[:300]}")
                target.out.seconds += time.perf_counter() - t0
                if trace_memory and (i + 1) % max(1, cases // checkpoints) == 0:
                    now, peak = tracemalloc.get_traced_memory()
                    memory.append((i + 1, now, peak))
                    if progress:
                        progress(f"{i + 1} cases, traced {now / 2**20:.1f} MiB (peak {peak / 2**20:.1f} MiB)")
            for target in (stats, agent_cmd, trainer_cmd):
                target.check()
            seconds = time.perf_counter() - start
        finally:
            if trace_memory:
                tracemalloc.stop()
            for target in (stats, agent_cmd, trainer_cmd):
                target.close()
            ctx.term()
            agent_log.removeHandler(crash)
            agent_log.setLevel(old_level)
            agent_log.propagate = old_propagate
    crashes += [f"receiver: {r.getMessage()}: {r.exc_info[1]!r}" for r in crash.records if r.exc_info]
    return Report([stats.out, agent_cmd.out, trainer_cmd.out], cases, seconds, memory, crashes)


def memory_growth(report: Report) -> int:
    """Traced bytes at the end minus at the first checkpoint after warm-up (20 % of the run)."""
    if len(report.memory) < 3:
        return 0
    warm = report.memory[max(1, len(report.memory) // 5) - 1][1]
    return report.memory[-1][1] - warm


MAX_GROWTH = 4 * 2**20
MAX_PEAK = 96 * 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="fuzz cases in all (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the memory check (runs faster)")
    args = parser.parse_args(argv)
    try:
        report = run(args.cases, args.seed, trace_memory=not args.no_tracemalloc, progress=print)
    except FuzzFailure as exc:
        print(f"FAILED: {exc}")
        return 1
    for out in report.outcomes:
        rate = out.cases / out.seconds if out.seconds else 0.0
        print(f"\n{out.name}: {out.cases} cases, {rate:,.0f} cases/s")
        for outcome, n in sorted(out.counts.items(), key=lambda kv: -kv[1]):
            print(f"  {outcome:24s} {n:8d}")
    failed = False
    if report.crashes:
        print(f"\nFAILED: {len(report.crashes)} unexpected errors, e.g. {report.crashes[0]}")
        failed = True
    if report.memory:
        growth, peak = memory_growth(report), max(p for _, _, p in report.memory)
        print(f"\ntraced memory: growth after warm-up {growth / 2**20:+.2f} MiB, peak {peak / 2**20:.1f} MiB")
        if growth > MAX_GROWTH or peak > MAX_PEAK:
            print(f"FAILED: memory not bounded (limits: growth {MAX_GROWTH >> 20} MiB, peak {MAX_PEAK >> 20} MiB)")
            failed = True
    print(f"\n{report.cases} cases in {report.seconds:.1f} s, seed {args.seed}")
    print(f"fuzz_cases_per_s={report.cases_per_s:.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
