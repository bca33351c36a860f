"""Fuzzing the agent's statistics decoder and both ends of the command channel (a CI-sized budget).

The targets and the mutation fuzzer are benchmarks/fuzz.py's (which runs 100k cases); here
hypothesis drives them: arbitrary frames, valid messages with fields replaced by arbitrary
JSON, and seeds for the mutation fuzzer.  Every case goes through the real sockets and code
paths (Receiver, CommandServer, ControlClient); after each one the agent's counters by reason
must equal the fuzzer's own prediction, and only the documented rejections may be raised.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import command_server, protocol
from agent.commands import CommandError, decode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fuzz  # noqa: E402

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
JSON_SETTINGS = settings(SETTINGS, max_examples=80)  # generating nested JSON is what costs here

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
HEADER_KEYS = ("v", "kind", "run", "rank", "step", "time", "seq", "sent", "dropped", "layout")
COMMAND_KEYS = ("v", "type", "id", "run", "action", "args", "reason", "issued_at", "status", "step", "rank", "detail")


@pytest.fixture(scope="module")
def targets():
    ctx = zmq.Context()
    agent_log = logging.getLogger("sentinel.agent")
    crash = fuzz._CrashCounter()
    agent_log.addHandler(crash)
    old_level = agent_log.level
    agent_log.setLevel(logging.DEBUG)
    with tempfile.TemporaryDirectory() as tmp:
        made = fuzz.StatsTarget(ctx), fuzz.AgentCommandTarget(ctx, Path(tmp)), fuzz.TrainerCommandTarget(ctx)
        yield (*made, crash)
        for target in made:
            target.close()
    agent_log.removeHandler(crash)
    agent_log.setLevel(old_level)
    ctx.term()


def feed_stats(targets, frames: list[bytes]) -> None:
    stats, *_, crash = targets
    stats.feed(frames)
    stats.check()
    assert not crash.records, crash.records[0].exc_info


def feed_commands(targets, raw: bytes, extra: list[bytes] = ()) -> None:
    _, agent_cmd, trainer_cmd, _ = targets
    agent_cmd.feed([*extra, raw])
    agent_cmd.check()
    trainer_cmd.feed(raw)
    trainer_cmd.check()


def valid_stats(rng_seed: int) -> list[bytes]:
    rng = random.Random(rng_seed)
    return fuzz.stats_frames(rng, rng.choice(fuzz.base_layouts(rng)), run="r", step=rng_seed % 1000)


@SETTINGS
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=6))
def test_arbitrary_frames_are_counted_by_reason(targets, frames):
    feed_stats(targets, frames)


@JSON_SETTINGS
@given(st.integers(0, 2**16), st.dictionaries(st.sampled_from(HEADER_KEYS) | st.text(max_size=4), json_values))
def test_header_fields_with_arbitrary_json(targets, seed, changes):
    frames = valid_stats(seed)
    header = {**json.loads(frames[0]), **changes}
    feed_stats(targets, [json.dumps(header).encode(), *frames[1:]])


@JSON_SETTINGS
@given(st.integers(0, 2**16), st.sampled_from(("scalars", "stats", "tensors", "roles")), json_values)
def test_layouts_with_arbitrary_json_and_a_matching_id(targets, seed, key, value):
    frames = valid_stats(seed)
    layout = {**json.loads(frames[1]), key: value}
    raw = json.dumps(layout).encode()
    header = {**json.loads(frames[0]), "layout": protocol.layout_id(raw)}
    feed_stats(targets, [json.dumps(header).encode(), raw, frames[2]])


@settings(SETTINGS, max_examples=300)
@given(st.integers(0, 2**32))
def test_mutation_fuzzer_cases(targets, seed):
    rng = random.Random(seed)
    feed_stats(targets, fuzz.mutate_stats(rng, fuzz.base_layouts(rng)))
    feed_commands(targets, fuzz.mutate_command(rng))


@JSON_SETTINGS
@given(st.integers(0, 2**16), st.dictionaries(st.sampled_from(COMMAND_KEYS) | st.text(max_size=4), json_values))
@example(0, {"type": "command", "action": []})  # an unhashable action once raised TypeError
@example(0, {"type": "command", "action": "lr_scale", "args": {"factor": float("nan")}})
def test_command_fields_with_arbitrary_json(targets, seed, changes):
    raw = fuzz.valid_command_frame(random.Random(seed))
    feed_commands(targets, json.dumps({**json.loads(raw), **changes}).encode())


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.binary(max_size=20), max_size=3))
def test_arbitrary_command_frames(targets, raw, extra):
    feed_commands(targets, raw, extra)


def test_unhashable_action_is_a_documented_rejection():
    with pytest.raises(CommandError) as info:
        decode(b'{"v": 1, "type": "command", "action": {"a": 1}, "id": "x", "run": "r"}')
    assert info.value.reason in command_server.REJECT_REASONS


def test_a_short_traced_run_has_no_crash_counts_every_reason_and_bounded_memory():
    report = fuzz.run(1200, seed=7, trace_memory=True, checkpoints=6)
    assert not report.crashes, report.crashes[:3]
    stats = report.outcomes[0]
    assert set(stats.counts) - {"accepted"} <= set(protocol.REJECT_REASONS)
    assert len(set(stats.counts) & set(protocol.REJECT_REASONS)) >= 6  # the mutations reach most reasons
    assert stats.counts["accepted"] > 0
    assert max(peak for _, _, peak in report.memory) < fuzz.MAX_PEAK
    assert fuzz.memory_growth(report) < fuzz.MAX_GROWTH
    assert np.isfinite(report.cases_per_s) and report.cases_per_s > 0
