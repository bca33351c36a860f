"""Policy: rules, cooldown, pending rollback, escalation, the rollback cap and stop; the supervisor
writes and fsyncs each decision before its command leaves, and a restart does not repeat one."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from agent_proc import make_frames

import agent.events
from agent.config import load_config
from agent.events import EventLog, read_events
from agent.history import SeriesHistory
from agent.policy import Policy, PolicyConfig, parse_rules
from agent.predict import Detection
from agent.protocol import decode
from agent.supervisor import Supervisor
from agent.typedconfig import ConfigError, build

LAYOUTS: dict = {}


def det(step, detector="loss_spike", severity="critical", run="r", layer=None):
    return Detection(run, 0, step, detector, severity, "loss", 9.0, f"{detector} at {step}", layer=layer)


def policy(**cfg) -> Policy:
    return Policy(build(PolicyConfig, cfg))


def decide_commit(p: Policy, d: Detection):
    decision = p.decide(d)
    if decision is not None:
        p.commit(decision)
    return decision


def actions(decision) -> list[tuple[str, dict]]:
    return [(c.action, c.args) for c in decision.commands]


def test_default_rules_are_the_palm_recipe_and_first_match_wins():
    p = policy()
    assert actions(p.decide(det(500))) == [("rollback", {"steps_back": 100, "skip": 200})]
    assert actions(p.decide(det(500, "nonfinite"))) == [("rollback", {"steps_back": 100, "skip": 200})]
    # a command reaches the trainer a step after the spike it answers: skipping the update is the in-step guard's
    assert actions(p.decide(det(500, "grad_norm_spike"))) == [("warn", {})]
    assert actions(p.decide(det(500, "loss_spike", "warning"))) == [("warn", {})]
    assert actions(p.decide(det(500, "attn_logit", "critical", layer="h.0.attn"))) == [("warn", {})]
    custom = policy(rules=[{"detector": "attn_logit", "action": "lr_scale", "args": {"factor": 0.5}}])
    assert actions(custom.decide(det(5, "attn_logit", "warning"))) == [("lr_scale", {"factor": 0.5})]
    assert custom.decide(det(5, "loss_spike")) is None  # no rule: detection only


SKIP_RULES = [
    {"detector": "grad_norm_spike", "severity": "critical", "action": "skip_update", "args": {"steps": 1}},
    {"detector": "loss_spike", "severity": "critical", "action": "rollback", "args": {"steps_back": 100, "skip": 200}},
    {"detector": "*", "severity": "warning", "action": "warn", "args": {}},
]


def test_cooldown_holds_back_actions_as_strong_but_not_stronger_ones():
    p = policy(cooldown_steps=50, rules=SKIP_RULES)
    assert decide_commit(p, det(500, "grad_norm_spike")).action == "skip_update"
    held = decide_commit(p, det(520, "grad_norm_spike"))
    assert held.suppressed == "cooldown" and held.commands == ()
    assert decide_commit(p, det(525, "loss_spike", "warning")).action == "warn"  # warnings are not held
    assert decide_commit(p, det(530, "loss_spike")).action == "rollback"  # stronger: goes through
    p2 = policy(cooldown_steps=50, rules=SKIP_RULES)
    decide_commit(p2, det(500, "grad_norm_spike"))
    assert decide_commit(p2, det(551, "grad_norm_spike")).suppressed is None


def test_stale_statistics_after_a_rollback_are_ignored_until_the_trainer_goes_back():
    p = policy()
    decide_commit(p, det(1000))
    assert decide_commit(p, det(1002, "nonfinite")).suppressed == "pending_rollback"
    p.rewind("r", 1003, 900)
    assert decide_commit(p, det(1000)).suppressed is None  # the same step in the new timeline is news


def test_escalation_then_the_cap_stops_the_run():
    p = policy(max_rollbacks=3, escalation={"within_steps": 1000, "lr_factor": 0.5})
    first = decide_commit(p, det(1000))
    assert (first.level, actions(first)) == (0, [("rollback", {"steps_back": 100, "skip": 200})])
    p.rewind("r", 1003, 900)
    second = decide_commit(p, det(950))
    assert second.level == 1
    assert actions(second) == [("rollback", {"steps_back": 200, "skip": 400}), ("lr_scale", {"factor": 0.5})]
    assert "escalation level 1" in second.reason
    p.rewind("r", 952, 750)
    third = decide_commit(p, det(800))
    assert actions(third) == [("rollback", {"steps_back": 400, "skip": 800}), ("lr_scale", {"factor": 0.5})]
    p.rewind("r", 801, 400)
    fourth = decide_commit(p, det(450))
    assert (fourth.action, actions(fourth)) == ("stop", [("stop", {})])
    assert "max_rollbacks=3" in fourth.reason
    assert decide_commit(p, det(460, "nonfinite")).suppressed == "stopped"
    p.rewind("r", 460, 0)  # a person restarts the run from an earlier checkpoint: a clean slate
    assert actions(decide_commit(p, det(100))) == [("rollback", {"steps_back": 100, "skip": 200})]


def test_rollbacks_far_apart_neither_escalate_nor_reach_the_cap():
    p = policy(max_rollbacks=2, rollback_window_steps=5000, escalation={"within_steps": 1000})
    step = 1000
    for _ in range(5):
        d = decide_commit(p, det(step))
        assert (d.action, d.level) == ("rollback", 0)
        p.rewind("r", step + 2, step - 100)
        step += 3000


def test_runs_are_independent_and_ids_are_deterministic():
    p = policy()
    a, b = decide_commit(p, det(10, run="a")), decide_commit(p, det(10, run="b"))
    assert a.action == b.action == "rollback" and a.commands[0].id != b.commands[0].id
    assert policy().decide(det(10, run="a")).commands[0].id == a.commands[0].id
    assert p.decide(det(10, run="a")) is None  # already decided


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"detector": "loss_spike", "action": "rollback", "args": {"steps_back": -1, "skip": 2}}],
            "policy.rules[0].args",
        ),
        ([{"detector": "loss_spike", "action": "rollback", "args": {"skip": 2}}], "needs steps_back"),
        ([{}, {"detector": "nope", "action": "warn"}], "policy.rules[1].detector: 'nope' is not allowed"),
        ([{"action": "warn", "colour": 1}], "policy.rules[0].colour: unknown key"),
        ([{"action": "explode"}], "policy.rules[0].action"),
    ],
)
def test_bad_rules_fail_at_load_naming_the_rule(rules, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(policy={"rules": rules})
    with pytest.raises(ConfigError):
        parse_rules(rules)


# -- the supervisor: predictors -> policy -> event log -> command ---------------------------------


class Pipeline:
    """A supervisor on a real events file, fed loss values as the receiver would."""

    def __init__(self, path, send=None, **config):
        self.cfg = load_config({"state_dir": str(path.parent), **config})
        self.events = EventLog(path)
        self.records = self.events.open()
        self.sup = Supervisor(self.cfg, self.events, send=send)
        self.sup.restore(self.records)
        self.series = SeriesHistory("r", 0, steps=1024, max_matrix_bytes=1 << 20, max_scalar_names=8)
        self.rng = np.random.default_rng(0)

    def feed(self, step, loss=None):
        loss = 3.0 + self.rng.normal(0, 0.02) if loss is None else loss
        msg = decode(make_frames(run="r", step=step, scalars={"loss": loss}), LAYOUTS, max_bytes=1 << 20)
        self.series.push(msg, 0.0)
        return self.sup.observe(msg, self.series)

    def run(self, steps, spikes=()):
        out = []
        for s in steps:
            out += self.feed(s, 9.0 if s in spikes else None)
        return out


def test_decision_is_written_and_fsynced_before_its_command_is_sent(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    trace: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(agent.events.os, "fsync", lambda fd: (trace.append("fsync"), real_fsync(fd))[1])
    sent = []

    def send(commands):
        on_disk = [json.loads(line) for line in path.read_text().splitlines()]
        decision = [r for r in on_disk if r["type"] == "decision"][-1]
        assert [c["id"] for c in decision["commands"]] == [c.id for c in commands]
        assert trace[-1] == "fsync"  # the last thing before the send was the fsync of that record
        trace.append("send")
        sent.extend(commands)

    p = Pipeline(path, send=send)
    decisions = p.run(range(200), spikes={150})
    assert [d.action for d in decisions] == ["rollback"] and len(sent) == 1
    assert trace[-2:] == ["fsync", "send"]
    rec = [r for r in read_events(path) if r["type"] == "decision"][0]
    assert rec["step"] == 150 and rec["detector"] == "loss_spike" and rec["evidence"]["window_values"] == 128
    assert rec["evidence"]["centre"] == pytest.approx(3.0, abs=0.05) and rec["value"] == 9.0
    assert p.sup.snapshot().actions == {"rollback": 1}


def test_restart_reads_the_log_back_and_does_not_repeat_a_decision(tmp_path):
    path = tmp_path / "events.jsonl"
    sent = []
    first = Pipeline(path, send=sent.extend)
    [decision] = first.run(range(160), spikes={150})
    first.events.close()

    second = Pipeline(path, send=sent.extend)  # a new agent process on the same state directory
    assert second.sup.policy.is_duplicate(decision.detection)
    assert second.sup._act(decision.detection) is None
    # the trainer has not rolled back yet: its statistics still spike, and even a NaN is not a new decision
    again = second.run(range(160, 190), spikes=set(range(160, 190)))
    again += second.feed(190, math.nan)
    assert [d.suppressed for d in again] == ["pending_rollback"]
    assert len(sent) == 1
    types = [r["type"] for r in read_events(path)]
    assert types.count("decision") == 1 and types.count("agent_start") == 0 and "suppressed" in types


def test_no_command_leaves_when_the_event_log_cannot_be_written(tmp_path, caplog):
    sent = []
    events = EventLog("/dev/full")  # a real ENOSPC on every write
    events.open()
    sup = Supervisor(load_config(), events, send=sent.extend)
    series = SeriesHistory("r", 0, steps=64, max_matrix_bytes=1 << 20, max_scalar_names=8)
    msg = decode(make_frames(run="r", step=3, scalars={"loss": math.nan}), LAYOUTS, max_bytes=1 << 20)
    series.push(msg, 0.0)
    assert sup.observe(msg, series) == [] and sent == []
    assert sup.snapshot().event_log_errors == 1 and events.errors == 1
    assert "decision not taken" in caplog.text
    events.close()


def trend(step, detector="attn_logit", severity="critical", **evidence):
    return Detection("r", 0, step, detector, severity, "attn_logit_max", 5e3, f"{detector} at {step}",
                     layer="h.0.attn", eta_steps=20.0, evidence=evidence)  # fmt: skip


def test_prevention_is_off_by_default_and_warns_only():
    assert actions(policy().decide(trend(300, span_steps=60.0))) == [("warn", {})]


def test_prevention_rolls_back_to_before_the_trend_and_lowers_the_lr():
    p = policy(prevention={"enabled": True})
    got = decide_commit(p, trend(300, span_steps=60.0))
    assert actions(got) == [("rollback", {"steps_back": 70, "skip": 0}), ("lr_scale", {"factor": 0.25})]
    assert got.rule == -1 and "lr_scale(factor=0.25)" in got.reason
    early = policy(prevention={"enabled": True}).decide(trend(40, span_steps=40.0))
    assert actions(early)[0] == ("rollback", {"steps_back": 40, "skip": 0})  # never before step 0
    assert p.decide(trend(310, span_steps=60.0)).suppressed == "pending_rollback"
    fresh = policy(prevention={"enabled": True})
    assert actions(fresh.decide(trend(310, severity="warning", span_steps=60.0))) == [("warn", {})]  # warnings warn


def test_prevention_undoes_an_lr_jump_and_a_bad_write_and_lowers_eps():
    p = policy(prevention={"enabled": True})
    jump = decide_commit(p, trend(150, "update_ratio", jump=9.7, lr=3e-2, lr_before=3e-3))
    assert actions(jump) == [("lr_scale", {"factor": pytest.approx(0.1)})]  # the schedule's jump: no replay
    q = policy(prevention={"enabled": True})
    other = actions(q.decide(trend(150, "update_ratio", jump=4.0)))  # a jump the LR does not explain
    assert other == [("rollback", {"steps_back": 1, "skip": 0}), ("lr_scale", {"factor": 0.25})]
    assert actions(q.decide(trend(150, "param_integrity"))) == [("rollback", {"steps_back": 1, "skip": 0})]
    assert actions(q.decide(trend(150, "adam_eps"))) == [("eps_scale", {"factor": 1e-3})]
    off = policy(prevention={"enabled": True, "detectors": ["attn_logit"]})
    assert actions(off.decide(trend(150, "adam_eps"))) == [("warn", {})]


def test_a_second_prevention_escalates_and_the_cap_still_stops_the_run():
    p = policy(prevention={"enabled": True}, max_rollbacks=2, cooldown_steps=10)
    decide_commit(p, trend(100, span_steps=50.0))
    p.rewind("r", 101, 50)
    second = decide_commit(p, trend(120, span_steps=50.0))
    assert second.level == 1 and actions(second)[1] == ("lr_scale", {"factor": 0.5})
    p.rewind("r", 121, 60)
    assert decide_commit(p, trend(140, span_steps=50.0)).action == "stop"


def test_a_critical_after_a_warning_of_the_same_detector_at_the_same_step_is_decided():
    p = policy()  # a probe message's NaN is a warning, the loss's NaN at the same step a critical
    assert decide_commit(p, det(150, "nonfinite", "warning")).action == "warn"
    assert decide_commit(p, det(150, "nonfinite", "critical")).action == "rollback"
    assert p.decide(det(150, "nonfinite", "critical")) is None  # but never twice


def test_prevention_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="policy.prevention.lr_factor"):
        load_config({"policy": {"prevention": {"lr_factor": 2.0}}})
