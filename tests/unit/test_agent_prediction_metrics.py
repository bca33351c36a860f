"""What the predictors and the policy put on /metrics: documented, promtool-clean names, bounded labels."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
from agent_proc import Pusher, fetch, make_frames, parse_metrics

from agent.daemon import Agent
from agent.metrics import lint_problems, stat_family_name
from agent.predict import DETECTORS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_prediction_families_are_documented_clean_and_filled(tmp_path):
    agent = Agent(
        {
            "stats_endpoint": "tcp://127.0.0.1:0",
            "metrics": {"port": 0},
            "commands": {"endpoint": "tcp://127.0.0.1:0"},
            "state_dir": str(tmp_path),
            "predict": {"trend": {"warmup_steps": 0}},  # the default since the zoo; kept as an explicit key
        }
    )
    rng = np.random.default_rng(0)
    with agent, Pusher(agent.stats_endpoint) as push:
        for step in range(120):
            loss = math.nan if step == 119 else 3.0 + rng.normal(0, 0.01)
            logit = 10.0 * math.exp(step / 20)
            push.send(make_frames(run="m", step=step, scalars={"loss": loss}, stats=("attn_logit_max",),
                                  tensors=("h.0.attn", "h.1.attn"), matrix=[[logit], [1.0]]))  # fmt: skip
        deadline = time.monotonic() + 10
        while (agent.state.received_messages < 120 or agent.state.decisions < 3) and time.monotonic() < deadline:
            time.sleep(0.01)  # the decision on the last message follows its receipt
        while time.monotonic() < deadline:  # the command server counts a held command on its own thread
            text = fetch(agent.metrics_url)
            if parse_metrics(text).value("sentinel_agent_undeliverable_commands_total") == 3:
                break
            time.sleep(0.05)
    s = parse_metrics(text)
    assert s.value("sentinel_spike_risk", run="m") == 1.0
    assert s.value("sentinel_spike_eta_steps", run="m", predictor="attn_logit") is not None
    assert s.value("sentinel_risk_explanation_info", run="m", predictor="attn_logit", layer="h.0.attn") == 1
    assert s.value("sentinel_detections_total", run="m", detector="nonfinite", severity="critical") == 1
    assert s.value("sentinel_agent_actions_total", action="rollback") == 1
    assert s.value("sentinel_agent_actions_total", action="stop") == 0
    # the attention warning and its critical (both warn), and the rollback: no trainer said hello
    assert s.value("sentinel_agent_undeliverable_commands_total") == 3
    assert s.value("sentinel_detections_total", run="m", detector="attn_logit", severity="critical") == 1
    doc = (DOCS / "metrics.md").read_text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    generic = {stat_family_name("attn_logit_max")}  # documented as sentinel_param_<name>
    missing = [name for name in types if f"`{name}`" not in doc and name not in generic]
    assert not missing, f"docs/metrics.md lacks {missing}"
    for name, kind in types.items():
        assert not lint_problems(name, kind), (name, lint_problems(name, kind))
    allowed = {"run", "rank", "param", "name", "reason", "version", "predictor", "detector", "severity", "layer",
               "action", "status", "module", "head"}  # fmt: skip
    for name, samples in s.items():
        for labels, _ in samples:
            assert set(labels) <= allowed, name


def test_policy_doc_names_every_detector():
    doc = (DOCS / "policy.md").read_text()
    assert all(f"`{d}`" in doc for d in DETECTORS)
