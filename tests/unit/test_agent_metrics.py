"""The receive -> state -> collector path without sockets: what /metrics shows for what arrives."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from agent_proc import Pusher, Scrape, fetch, make_frames, parse_metrics, with_header
from prometheus_client import REGISTRY, generate_latest

from agent import __version__
from agent.config import load_config
from agent.daemon import Agent
from agent.metrics import (
    SCALAR_FAMILIES,
    STAT_FAMILIES,
    lint_problems,
    make_registry,
    stat_family_name,
    top_k,
)
from agent.protocol import REJECT_REASONS, layout_id
from agent.receive import RateLimiter, Receiver
from agent.state import AgentState

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ALL_STATS = tuple(STAT_FAMILIES)


class Fixture:
    def __init__(self, **overrides):
        self.config = load_config(**overrides)
        self.state = AgentState(self.config)
        self.receiver = Receiver(self.state, self.config)
        self.registry = make_registry(self.state, self.config)

    def send(self, frames, received_at=None):
        return self.receiver.handle(frames, received_at)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def scrape(self) -> Scrape:
        return parse_metrics(self.text())


def full_message(**kw):
    kw.setdefault("scalars", {"loss": 2.5, "grad_norm": 1.5, "step_duration_seconds": 0.25, "lr": 0.5, "tokens": 7.0})
    kw.setdefault("stats", ALL_STATS)
    kw.setdefault("tensors", ("w1", "w2"))
    kw.setdefault("matrix", np.arange(2 * len(kw["stats"])).reshape(2, -1) + 1)
    return make_frames(**kw)


def family_names(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def test_empty_agent_exposes_every_fixed_family_with_help():
    f = Fixture()
    text = f.text()
    types = family_names(text)
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, flags=re.M))
    assert set(types) == set(helps)
    for name, doc in SCALAR_FAMILIES.values():
        assert types[name] == "gauge" and helps[name] == doc
    for name, _ in STAT_FAMILIES.values():
        assert types[name] == "gauge"
    for name in (
        "sentinel_agent_received_messages_total",
        "sentinel_agent_decisions_total",
        "sentinel_trainer_sent_messages_total",
        "sentinel_agent_nonfinite_values_total",
    ):
        assert types[name] == "counter"
    for name, kind in types.items():
        assert not lint_problems(name, kind), (name, lint_problems(name, kind))


def test_every_reject_reason_is_exposed_from_zero():
    s = Fixture().scrape()
    assert {lab["reason"]: v for lab, v in s.samples("sentinel_agent_rejected_messages_total")} == dict.fromkeys(
        REJECT_REASONS, 0.0
    )
    assert s.value("sentinel_agent_received_messages_total") == 0
    assert s.value("sentinel_agent_tracked_series") == 0
    assert s.value("sentinel_agent_build_info", version=__version__) == 1


def test_uses_its_own_registry():
    Fixture().send(full_message())
    assert "sentinel_loss" not in generate_latest(REGISTRY).decode()


def test_good_message_fills_every_series_family():
    f = Fixture()
    assert f.send(full_message(run="r1", rank=2, step=41, sent=40, dropped=3), received_at=1700000000.5) is not None
    s = f.scrape()
    lab = {"run": "r1", "rank": "2"}
    assert s.value("sentinel_training_step", **lab) == 41
    assert s.value("sentinel_loss", **lab) == 2.5
    assert s.value("sentinel_grad_norm", **lab) == 1.5
    assert s.value("sentinel_step_duration_seconds", **lab) == 0.25
    assert s.value("sentinel_learning_rate", **lab) == 0.5
    assert s.value("sentinel_observed_value", name="tokens", **lab) == 7.0
    assert len(s.samples("sentinel_observed_value")) == 1
    assert s.value("sentinel_last_message_timestamp_seconds", **lab) == 1700000000.5
    assert s.value("sentinel_trainer_sent_messages_total", **lab) == 40
    assert s.value("sentinel_trainer_dropped_messages_total", **lab) == 3
    assert s.value("sentinel_agent_nonfinite_values_total", **lab) == 0
    assert s.value("sentinel_agent_received_messages_total") == 1
    assert s.value("sentinel_agent_tracked_series") == 1
    assert s.value("sentinel_agent_history_bytes") > 0
    for j, stat in enumerate(ALL_STATS):
        family = STAT_FAMILIES[stat][0]
        assert s.value(family, param="w1", **lab) == 1 + j
        assert s.value(family, param="w2", **lab) == 1 + len(ALL_STATS) + j


def test_latest_message_wins_and_per_tensor_values_survive_scalar_only_messages():
    f = Fixture()
    f.send(full_message(step=1))
    f.send(make_frames(step=2, scalars={"loss": 9.0}))
    s = f.scrape()
    assert s.value("sentinel_training_step") == 2 and s.value("sentinel_loss") == 9.0
    assert s.value("sentinel_grad_norm") is None  # not in the latest message
    assert s.value("sentinel_param_grad_l2_norm", param="w1") == 1


def test_nan_and_inf_are_exported_and_counted(caplog):
    f = Fixture()
    with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
        f.send(full_message(scalars={"loss": np.nan, "lr": np.inf}, stats=("grad_l2",), matrix=[[np.nan], [-np.inf]]))
    s = f.scrape()
    assert np.isnan(s.value("sentinel_loss")) and np.isposinf(s.value("sentinel_learning_rate"))
    assert np.isnan(s.value("sentinel_param_grad_l2_norm", param="w1"))
    assert np.isneginf(s.value("sentinel_param_grad_l2_norm", param="w2"))
    assert s.value("sentinel_agent_nonfinite_values_total", run="run", rank="0") == 4
    assert sum(v for _, v in s.samples("sentinel_agent_rejected_messages_total")) == 0
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(lines) == 1 and "count=4" in lines[0] and "loss" in lines[0]


def test_top_k_tensors_per_stat_nan_counts_as_largest():
    f = Fixture(**{"export.max_tensors_per_stat": 3})
    values = np.array([[5.0, 1.0], [np.nan, 2.0], [1.0, 3.0], [9.0, 4.0], [-np.inf, 5.0], [7.0, np.inf]])
    tensors = tuple(f"t{i}" for i in range(len(values)))
    f.send(make_frames(stats=("grad_l2", "update_ratio"), tensors=tensors, matrix=values))
    s = f.scrape()
    assert {lab["param"] for lab, _ in s.samples("sentinel_param_grad_l2_norm")} == {"t1", "t3", "t5"}
    assert {lab["param"] for lab, _ in s.samples("sentinel_param_update_ratio")} == {"t5", "t4", "t3"}


def test_top_k_helper():
    np.testing.assert_array_equal(top_k(np.array([1.0, np.nan, 3.0, 3.0, -1.0]), 3), [1, 2, 3])
    np.testing.assert_array_equal(top_k(np.array([1.0, 2.0]), 5), [0, 1])


def test_number_of_exported_stats_is_bounded():
    f = Fixture(**{"export.max_stats": 2})
    f.send(full_message())
    s = f.scrape()
    exported = {STAT_FAMILIES[st][0] for st in ALL_STATS if s.samples(STAT_FAMILIES[st][0])}
    assert exported == {STAT_FAMILIES[ALL_STATS[0]][0], STAT_FAMILIES[ALL_STATS[1]][0]}


@pytest.mark.parametrize(
    "stat",
    [
        "Weird-ms",
        "x_total",
        "count",
        "gauge",
        "latency_milliseconds",
        "s",
        "a:b",
        "fooBar",
        "h_m_s",
        "!!!",
        "ünïcode",
        "bytes_sum",
        "1st",
        "x" * 300,
        "kilo_s",
        "m_s_total_bucket",
    ],
)
def test_unknown_stat_names_become_promtool_clean_families(stat):
    name = stat_family_name(stat)
    assert name.startswith("sentinel_param_") and not lint_problems(name), (name, lint_problems(name))
    assert len(name) < 100


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sentinel_x_milliseconds", "gauge"),
        ("sentinel_x_hours", "gauge"),
        ("sentinel_x_ms", "gauge"),
        ("sentinel_s_x", "gauge"),
        ("sentinel_x_total", "gauge"),
        ("sentinel_x", "counter"),
        ("sentinel_x_count", "gauge"),
        ("sentinel_x_sum", "gauge"),
        ("sentinel_x_bucket", "gauge"),
        ("sentinel_x_gauge", "gauge"),
        ("sentinel_counter_x", "gauge"),
        ("sentinel_a:b", "gauge"),
        ("sentinel_fooBar", "gauge"),
        ("1sentinel", "gauge"),
    ],
)
def test_local_lint_flags_what_promtool_flags(name, kind):
    assert lint_problems(name, kind)


def test_local_lint_accepts_good_names():
    for name in ("sentinel_step_duration_seconds", "sentinel_x_bytes", "sentinel_param_grad_l2_norm"):
        assert not lint_problems(name)
    assert not lint_problems("sentinel_x_total", "counter")


def test_unknown_stat_is_exported_under_its_sanitised_name():
    f = Fixture()
    f.send(make_frames(stats=("grad_max",), tensors=("w",), matrix=[[3.0]]))
    text = f.text()
    assert "# TYPE sentinel_param_grad_max gauge" in text
    assert "'grad_max'" in text  # generic HELP names the statistic
    assert f.scrape().value("sentinel_param_grad_max", param="w") == 3.0


def test_stat_colliding_with_a_known_family_is_not_exported_twice():
    f = Fixture()
    f.send(make_frames(stats=("grad_l2", "grad-L2-norm"), tensors=("w",), matrix=[[1.0, 2.0]]))
    text = f.text()
    assert text.count("# TYPE sentinel_param_grad_l2_norm gauge") == 1
    assert f.scrape().value("sentinel_param_grad_l2_norm", param="w") == 1.0


def test_two_unknown_stats_colliding_export_the_first_only():
    f = Fixture()
    f.send(make_frames(stats=("my.stat", "my-stat"), tensors=("w",), matrix=[[1.0, 2.0]]))
    assert f.text().count("# TYPE sentinel_param_my_stat gauge") == 1
    assert f.scrape().value("sentinel_param_my_stat", param="w") == 1.0


def test_observed_scalar_names_are_bounded():
    f = Fixture(**{"limits.max_scalar_names": 3})
    f.send(make_frames(scalars={f"s{i}": float(i) for i in range(10)} | {"loss": 1.0}))
    s = f.scrape()
    assert {lab["name"] for lab, _ in s.samples("sentinel_observed_value")} == {"s0", "s1", "s2"}
    assert s.value("sentinel_loss") == 1.0


def test_step_is_never_a_label():
    f = Fixture()
    f.send(full_message(step=123))
    for name, samples in f.scrape().items():
        for labels, _ in samples:
            assert set(labels) <= {"run", "rank", "param", "name", "reason", "version"}, name


def test_label_values_are_escaped():
    f = Fixture()
    f.send(make_frames(run='a"b\\c\nd', stats=("grad_l2",), tensors=('x"y',), matrix=[[1.0]]))
    s = f.scrape()
    assert s.value("sentinel_param_grad_l2_norm", run='a"b\\c\nd', param='x"y') == 1.0


def test_decisions_counter_counts_recorded_decisions():
    f = Fixture()
    assert f.scrape().value("sentinel_agent_decisions_total") == 0
    f.state.record_decision()
    f.state.record_decision(2)
    assert f.scrape().value("sentinel_agent_decisions_total") == 3
    with pytest.raises(ValueError):
        f.state.record_decision(-1)


def test_evicted_series_leaves_metrics(caplog):
    f = Fixture(**{"limits.max_series": 2})
    with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
        for run in ("a", "b", "c"):
            f.send(make_frames(run=run, scalars={"loss": 1.0}))
    s = f.scrape()
    assert s.value("sentinel_agent_tracked_series") == 2
    assert {lab["run"] for lab, _ in s.samples("sentinel_loss")} == {"b", "c"}
    assert any("stopped tracking run=a rank=0" in r.getMessage() for r in caplog.records)


# Rejections: counted by reason, one log line each, never an exception.


def reject_reason(f: Fixture, frames, caplog) -> str:
    before = dict(f.state.rejected_messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
        assert f.send(frames) is None
    changed = [r for r in REJECT_REASONS if f.state.rejected_messages[r] != before[r]]
    assert len(changed) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"reason={changed[0]} " in lines[0]
    return changed[0]


def test_receiver_rejections(caplog):
    f = Fixture(**{"limits.max_message_bytes": 4096})
    good = make_frames(scalars={"loss": 1.0})
    assert reject_reason(f, good[:2], caplog) == "frame_count"
    assert reject_reason(f, [b"{{", *good[1:]], caplog) == "malformed_header"
    assert reject_reason(f, with_header(good, v=2), caplog) == "unsupported_version"
    assert reject_reason(f, with_header(good, rank=-1), caplog) == "bad_field"
    assert reject_reason(f, [good[0], b"[]", good[2]], caplog) == "layout_mismatch"
    assert reject_reason(f, [good[0], good[1], good[2] + b"\0"], caplog) == "size_mismatch"
    assert reject_reason(f, [good[0], good[1], b"\0" * 5000], caplog) == "oversized"
    s = f.scrape()
    assert s.value("sentinel_agent_received_messages_total") == 7
    assert s.value("sentinel_agent_tracked_series") == 0


@pytest.mark.parametrize(
    "frames",
    [
        make_frames(stats=("grad_l2",), tensors=("w", "w")),
        make_frames(stats=("a", "a"), tensors=("w",)),
        make_frames(tensors=("\ud800",), stats=("grad_l2",)),
    ],
    ids=["duplicate-tensor", "duplicate-stat", "surrogate-tensor"],
)
def test_layouts_the_exporter_cannot_represent_are_rejected(frames, caplog):
    f = Fixture()
    assert reject_reason(f, frames, caplog) == "malformed_layout"
    f.text()


def test_duplicate_scalar_names_are_rejected(caplog):
    f = Fixture()
    frames = make_frames(scalars={"loss": 1.0, "lr": 2.0})
    layout = frames[1].replace(b'"lr"', b'"loss"')
    duplicated = [with_header(frames, layout=layout_id(layout))[0], layout, frames[2]]
    assert reject_reason(f, duplicated, caplog) == "malformed_layout"


def test_surrogate_run_name_is_rejected_and_scrape_still_works(caplog):
    f = Fixture()
    assert reject_reason(f, make_frames(run="bad\ud800run"), caplog) == "bad_field"
    assert f.scrape().value("sentinel_agent_rejected_messages_total", reason="bad_field") == 1


def test_step_beyond_int64_is_rejected(caplog):
    f = Fixture()
    assert reject_reason(f, with_header(make_frames(), step=2**64), caplog) == "bad_field"


def test_deeply_nested_json_is_counted_not_raised(caplog):
    f = Fixture()
    good = make_frames()
    assert reject_reason(f, [b"[" * 100_000 + b"]" * 100_000, *good[1:]], caplog) == "malformed_header"


def test_internal_error_is_counted_as_bad_field(monkeypatch, caplog):
    f = Fixture()

    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(f.state, "record_message", broken)
    assert reject_reason(f, make_frames(), caplog) == "bad_field"
    assert "internal error RuntimeError: boom" in caplog.records[0].getMessage()


def test_peer_text_in_log_lines_is_escaped_and_truncated(caplog):
    f = Fixture()
    good = make_frames()
    with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
        f.send(with_header(good, layout="x\nFAKE LOG LINE" + "y" * 10_000))
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 500 and "reason=bad_field" in line


def test_log_lines_are_rate_limited_per_reason(caplog):
    now = [0.0]
    f = Fixture()
    f.receiver.limiter = RateLimiter(burst=10, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="sentinel.agent"):
        for _ in range(25):
            f.send([b"{{", b"", b""])
        f.send(with_header(make_frames(), v=9))
        assert len([r for r in caplog.records if "reason=malformed_header" in r.getMessage()]) == 10
        assert len([r for r in caplog.records if "reason=unsupported_version" in r.getMessage()]) == 1
        f.receiver.limiter.flush()
        assert not [r for r in caplog.records if "suppressed" in r.getMessage()]
        now[0] = 61.0
        f.receiver.limiter.flush()
    summaries = [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]
    assert summaries == ["suppressed 15 more 'malformed_header' log lines in the last 60 s"]
    assert f.state.rejected_messages["malformed_header"] == 25


# docs/metrics.md must describe every family the agent can expose.


def test_metrics_doc_lists_every_family():
    f = Fixture()
    f.send(full_message())
    doc = DOC.read_text()
    missing = [name for name in family_names(f.text()) if f"`{name}`" not in doc]
    assert not missing, f"docs/metrics.md lacks {missing}"


# The same path through the real listeners, in-process.


def test_in_process_agent_serves_metrics_and_stops_promptly(tmp_path):
    agent = Agent(
        {
            "stats_endpoint": "tcp://127.0.0.1:0",
            "metrics": {"port": 0},
            "commands": {"endpoint": "tcp://127.0.0.1:0"},
            "state_dir": str(tmp_path),
        }
    )
    with agent:
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", agent.stats_endpoint)
        assert agent.stats_endpoint != "tcp://127.0.0.1:0"
        assert re.fullmatch(rf"http://127\.0\.0\.1:{agent.metrics_port}/metrics", agent.metrics_url)
        assert agent.healthy
        with Pusher(agent.stats_endpoint) as push:
            push.send(make_frames(scalars={"loss": 4.5}))
            deadline = time.monotonic() + 5
            while agent.state.received_messages < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert parse_metrics(fetch(agent.metrics_url)).value("sentinel_loss") == 4.5
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert not agent.healthy
    agent.stop()  # idempotent
    with pytest.raises(OSError):
        fetch(agent.metrics_url, timeout=1)
