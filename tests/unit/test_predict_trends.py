"""Trend and jump predictors on synthetic series: ETAs that are right, rises that end retracted, rows
the mechanism does not apply to ignored, the ε in force read, refits on schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_predict import MODULES, PARAMS, ROLES, Feeder, predictor

from agent.predict.attn_logit import AttnLogit


def logits(f: Feeder, values, every: int = 1, start: int = 0) -> None:
    """Feed row 0 of MODULES the values (one per step), the others a flat 20."""
    for i, v in enumerate(values):
        t = start + i
        if t % every == 0:
            f.feed(t, {"loss": 3.0}, stats=("attn_logit_max",), tensors=MODULES, matrix=[[v], [20.0], [20.0], [20.0]])


def test_attention_logit_growth_gives_an_eta_within_20_percent_then_warns_then_is_critical():
    f = Feeder()
    rng = np.random.default_rng(1)
    k = math.log(1e4 / 100.0) / 400  # 100 at step 0, crosses 1e4 at step 400
    logits(f, [100.0 * math.exp(k * t + rng.normal(0, 0.03)) for t in range(100)])
    assert f.pred.forecasts == {}  # an ETA of 300 from a 60-step line is further than trend.max_reach allows
    logits(f, [100.0 * math.exp(k * t + rng.normal(0, 0.03)) for t in range(100, 250)], start=100)
    eta = f.pred.etas()["attn_logit"]
    assert abs(eta - (400 - 249)) <= 0.2 * (400 - 249)
    assert "ETA to 10000" in f.pred.top_forecasts()["attn_logit"].message
    logits(f, [100.0 * math.exp(k * t) for t in range(250, 400)], start=250)
    got = [(d.severity, d.layer) for d in f.by("attn_logit")]
    assert got == [("warning", "h.0.attn"), ("critical", "h.0.attn")]
    warn, crit = f.by("attn_logit")
    assert 400 - warn.step == pytest.approx(3 * 60, abs=20)  # the first ETA max_reach x window allows, seen at a refit
    assert 400 - crit.step == pytest.approx(25, abs=5)  # trend.critical_eta_steps
    curve = crit.evidence["curve"]
    assert curve["limit"] == 1e4 and curve["scale"] == "log" and len(curve["steps"]) == len(curve["values"]) > 5
    assert curve["at_value"] == pytest.approx(crit.value, rel=0.05)
    assert f.pred.risk().score == 1.0


def test_the_rise_from_initialisation_every_healthy_run_shows_is_not_extrapolated():
    f = Feeder()
    # 0.1 at step 0, saturating at 40 by step ~80 (the zoo's healthy runs), then noise
    rng = np.random.default_rng(2)
    logits(f, [40.0 * (1 - math.exp(-t / 25)) + 0.1 + rng.normal(0, 0.5) for t in range(400)], every=10)
    assert f.by("attn_logit") == [] and f.pred.forecasts == {}


def test_a_trend_that_ends_is_retracted_within_the_window():
    f = Feeder()
    k = math.log(20.0) / 100  # 200 -> 4000 over 100 steps, then flat
    values = [200.0 * math.exp(k * min(t, 100)) for t in range(400)]
    seen = []
    for t, v in enumerate(values):
        logits(f, [v], start=t)
        seen.append(("attn_logit", "h.0.attn") in f.pred.forecasts)
    assert any(seen[60:100])  # forecast while it rises
    gone = seen.index(False, 100)
    assert gone - 100 <= f.cfg.trend.window_steps  # retracted once the line stops rising
    assert not any(seen[gone:])  # and never comes back on a flat series (no stale ETA)
    assert f.pred.risk().score < 0.5 or f.pred.risk().predictor != "attn_logit"


def test_probe_cadence_does_not_delay_the_first_warning_by_more_than_its_period():
    k = math.log(1e4 / 100.0) / 300
    values = [100.0 * math.exp(k * t) for t in range(300)]
    first = {}
    for every in (1, 10):
        f = Feeder(trend={"every_steps": 1})
        logits(f, values, every=every)
        first[every] = f.by("attn_logit")[0].step
    assert first[1] <= first[10] <= first[1] + 10 + 10


def test_a_value_past_its_limit_is_critical_at_its_step_between_refits():
    fits = []
    real = AttnLogit.forecasts
    f = Feeder(trend={"every_steps": 20})
    p = predictor(f, "attn_logit")
    p.forecasts = lambda msg, series: fits.append(msg.step) or real(p, msg, series)
    logits(f, [30.0] * 73 + [2e4])  # fits at 0, 20, 40, 60: step 73 is between two
    assert fits == [0, 20, 40, 60, 73]
    assert [(d.step, d.severity, d.layer) for d in f.by("attn_logit")] == [(73, "critical", "h.0.attn")]


def test_a_trending_predictor_is_refitted_on_every_message():
    fits = []
    real = AttnLogit.forecasts
    f = Feeder(trend={"every_steps": 20})
    p = predictor(f, "attn_logit")
    p.forecasts = lambda msg, series: fits.append(msg.step) or real(p, msg, series)
    k = math.log(1e4 / 100.0) / 300
    logits(f, [100.0 * math.exp(k * t) for t in range(200)])
    assert ("attn_logit", "h.0.attn") in f.pred.forecasts
    assert [s for s in fits if s < 20] == [0] and fits[-20:] == list(range(180, 200))


def _eps_run(f: Feeder, sqrt_v, eps_col=None, grad_rms=None, steps: int = 200, roles=ROLES):
    stats = ("sqrt_v_rms", "grad_rms") + (("adam_eps",) if eps_col is not None else ())
    for t in range(steps):
        v = sqrt_v(t)
        rows = []
        for i in range(len(PARAMS)):
            row = [v[i], (grad_rms[i] if grad_rms is not None else 1.0)]
            if eps_col is not None:
                row.append(eps_col[i])
            rows.append(row)
        f.feed(t, {"loss": 3.0, "adam_eps": 1e-8}, stats=stats, tensors=PARAMS, matrix=rows, roles=roles)


def test_sqrt_v_falling_towards_eps_warns_with_an_eta_then_is_critical():
    f = Feeder()
    n = len(PARAMS)
    _eps_run(f, lambda t: [1e-6 * math.exp(-t / 30)] * n)  # reaches eps 1e-8 at step ~138
    got = f.by("adam_eps")
    assert [d.severity for d in got] == ["warning", "critical"]
    assert got[0].eta_steps is not None and got[0].step < 138 - 40
    assert "the Adam ε 1e-08 in force" in got[0].message
    assert got[0].evidence["layer_count"] == 16  # the 16 matrices; the gain and the bias do not count


def test_the_eps_in_force_is_read_per_tensor():
    n = len(PARAMS)
    tuned = Feeder()  # ε auto-tuning: every tensor's ε is 1e-16, far below its √v̂ of 1e-9
    _eps_run(tuned, lambda t: [1e-9] * n, eps_col=[1e-16] * n)
    assert tuned.by("adam_eps") == []
    stalled = Feeder()  # the same √v̂ with the user's ε 1e-8: every update is shrunk
    _eps_run(stalled, lambda t: [1e-9] * n, eps_col=[1e-8] * n)
    assert [d.severity for d in stalled.by("adam_eps")] == ["critical"]


def test_sqrt_v_near_eps_is_a_warning_once_it_stays_there():
    n = len(PARAMS)
    brief = Feeder()  # step 0 only (before ε auto-tuning acts): one point is not a level
    _eps_run(brief, lambda t: [5e-8 if t == 0 else 1e-3] * n)
    assert brief.by("adam_eps") == []
    level = Feeder()  # 5 ε from step 0 on, flat: a warning after trend.min_points points, no ETA
    _eps_run(level, lambda t: [5e-8] * n, steps=50)
    got = level.by("adam_eps")
    assert [(d.severity, d.step, d.eta_steps) for d in got] == [("warning", 4, None)]


def test_tensors_without_gradient_and_gains_are_not_an_eps_stall():
    n = len(PARAMS)
    # a bias with no gradient by construction (sqrt_v 0, grad 0), and a gain with a tiny sqrt_v: neither counts
    f = Feeder()
    v = [1e-3] * (n - 2) + [1e-10, 0.0]
    _eps_run(f, lambda t: v, grad_rms=[1.0] * (n - 2) + [1e-10, 0.0])
    assert f.by("adam_eps") == []
    # without roles on the wire the names still tell the gain and the bias apart
    f = Feeder()
    _eps_run(f, lambda t: v, grad_rms=[1.0] * (n - 2) + [1e-10, 0.0], roles=())
    assert f.by("adam_eps") == []


def test_log_z_drift_warns_before_its_limit():
    f = Feeder()
    for t in range(0, 300, 5):
        f.feed(t, {"log_z_mean": 5.5 + (0.0 if t < 100 else 0.05 * (t - 100))})
    got = f.by("log_z")
    assert got and got[0].severity == "warning" and got[0].statistic == "log_z_mean"
    assert got[0].step < 100 + 10 / 0.05  # before the drift reaches 10 nats at step 300


def _ratios(f: Feeder, steps: int, ratio, lr):
    for t in range(steps):
        f.feed(t, {"loss": 3.0, "lr": lr(t)}, stats=("update_ratio",), tensors=PARAMS,
               matrix=[[ratio(t) * (50.0 if r in ("norm", "bias") else 1.0)] for r in ROLES], roles=ROLES)  # fmt: skip


def test_an_lr_jump_is_critical_at_its_step_and_names_the_lr():
    f = Feeder()
    lr = lambda t: 3e-3 * (10.0 if t >= 150 else 1.0)
    _ratios(f, 200, lambda t: lr(t) * 10.0, lr)
    got = f.by("update_ratio")
    assert [(d.step, d.severity) for d in got] == [(150, "critical")]
    assert got[0].evidence["jump"] == pytest.approx(10.0) and got[0].evidence["lr"] == pytest.approx(3e-2)
    assert "the learning rate went from 0.003 to 0.03 (10.00×)" in got[0].message


def test_an_lr_warm_up_is_not_a_jump():
    f = Feeder()
    lr = lambda t: 3e-3 * min(1.0, (t + 1) / 20)
    _ratios(f, 200, lambda t: lr(t) * 10.0, lr)
    assert f.by("update_ratio") == []


def test_the_spread_of_update_ratios_counts_matrices_only():
    f = Feeder()
    for t in range(300):
        big = 8.0 * math.exp(math.log(4.0) * t / 200)  # the spread of one matrix grows 8 -> 32 over 200 steps
        matrix = [[1e-3 * (big if name == "h.3.mlp.c_proj.weight" else 1.0) * (1e3 if r in ("norm", "bias") else 1.0)]
                  for name, r in zip(PARAMS, ROLES)]  # fmt: skip
        f.feed(t, {"loss": 3.0}, stats=("update_ratio",), tensors=PARAMS, matrix=matrix, roles=ROLES)
    got = f.by("update_ratio_spread")
    assert got and got[0].layer == "h.3.mlp.c_proj.weight" and got[0].evidence["matrices"] == 16


def _norms(f: Feeder, steps: int, write=None, skip_at=()):
    norm, upd = 5.0, 1e-3
    for t in range(steps):
        u = 0.0 if t in skip_at else upd
        if write is not None and t == write[0]:
            norm = write[1]
        f.feed(t, {"loss": 3.0}, stats=("param_l2", "update_l2"), tensors=PARAMS[:2],
               matrix=[[norm, u], [2.0, 1e-3]])  # fmt: skip
        norm += 0.9 * u


def test_a_weight_written_outside_the_optimizer_is_critical_at_the_step_it_is_used():
    clean = Feeder()
    _norms(clean, 100, skip_at=(40, 41))
    assert clean.by("param_integrity") == []
    f = Feeder()
    _norms(f, 100, write=(60, 30.0))
    got = f.by("param_integrity")
    assert [(d.step, d.severity, d.layer) for d in got] == [(60, "critical", PARAMS[0])]
    assert got[0].evidence["update_l2"] == pytest.approx(1e-3)
