"""Predictors on synthetic series: quiet on noise, loud on spikes, NaN and trends, with ETAs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from agent_proc import make_frames

from agent.history import SeriesHistory
from agent.predict import PredictConfig, SeriesPredictor, TrendPredictors, fit_lines
from agent.protocol import decode
from agent.typedconfig import build

LAYOUTS: dict = {}
PARAMS = tuple(f"h.{i}.{m}.weight" for i in range(4) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
PARAMS += ("h.0.ln_1.weight", "h.0.attn.c_attn.bias")
MODULES = ("h.0.attn", "h.1.attn", "h.0.mlp.c_proj", "h.1.mlp.c_proj")


def message(step, scalars, stats=(), tensors=(), matrix=None):
    frames = make_frames(step=step, scalars=scalars, stats=stats, tensors=tensors, matrix=matrix)
    return decode(frames, LAYOUTS, max_bytes=1 << 24)


class Feeder:
    """A series history and its predictor, fed message by message as the receiver would."""

    def __init__(self, **config):
        self.cfg = build(PredictConfig, config)
        self.series = SeriesHistory("run", 0, steps=1024, max_matrix_bytes=1 << 24, max_scalar_names=64)
        self.pred = SeriesPredictor("run", 0, self.cfg)
        self.detections = []

    def feed(self, step, scalars, **matrix):
        msg = message(step, scalars, **matrix)
        self.series.push(msg, float(step))
        found = self.pred.observe(msg, self.series)
        self.detections += found
        return found


def clean_run(feeder: Feeder, steps: int, seed: int = 0, spike_at: dict | None = None):
    """A healthy run: loss decays with noise, grad norm log-normal, stationary per-tensor stats and probes."""
    rng = np.random.default_rng(seed)
    spike_at = spike_at or {}
    for t in range(steps):
        loss = 2.5 + 2.0 * math.exp(-t / 400) + rng.normal(0, 0.03)
        loss *= spike_at.get(t, 1.0)
        scalars = {"loss": loss, "grad_norm": float(np.exp(rng.normal(0, 0.25))), "lr": 3e-4}
        param_stats = np.column_stack(
            [
                3e-4 * np.exp(rng.normal(0, 0.2, len(PARAMS))),  # update_ratio
                1e-3 * np.exp(rng.normal(0, 0.2, len(PARAMS))),  # grad_rms
                1e-3 * np.exp(rng.normal(0, 0.2, len(PARAMS))),  # sqrt_v_rms
            ]
        )
        feeder.feed(t, scalars, stats=("update_ratio", "grad_rms", "sqrt_v_rms"), tensors=PARAMS, matrix=param_stats)
        probes = np.column_stack(
            [30 * np.exp(rng.normal(0, 0.1, len(MODULES))), 1.0 * np.exp(rng.normal(0, 0.1, len(MODULES)))]
        )
        feeder.feed(t, {"log_z_mean": rng.normal(0, 0.3)}, stats=("attn_logit_max", "out_rms"), tensors=MODULES,
                    matrix=probes)  # fmt: skip


def test_clean_noisy_run_gives_no_detection_over_2000_steps():
    f = Feeder()
    clean_run(f, 2000)
    assert f.detections == []
    assert f.pred.risk().score < 0.5
    assert f.pred.etas() == {} or min(f.pred.etas().values()) > f.cfg.trend.warn_eta_steps


@pytest.mark.parametrize("method", ["mad", "ema"])
def test_three_times_loss_jump_is_detected_at_that_step(method):
    f = Feeder(loss={"method": method})
    clean_run(f, 1000, spike_at={990: 3.0})
    spikes = [d for d in f.detections if d.detector == "loss_spike"]
    assert [(d.step, d.severity) for d in spikes] == [(990, "critical")]
    d = spikes[0]
    assert d.statistic == "loss" and 2.5 < d.evidence["ratio"] < 3.5 and d.evidence["z"] > 6
    assert "loss" in d.message and "step 990" in d.message
    assert f.pred.risk().score >= 0.9 and "loss_spike" in f.pred.risk().explanation


def test_ten_times_grad_norm_jump_is_critical_on_the_log_scale():
    f = Feeder()
    rng = np.random.default_rng(3)
    for t in range(1000):
        gn = float(np.exp(rng.normal(0, 0.25))) * (12.0 if t == 995 else 1.0)
        f.feed(t, {"loss": 3.0 + rng.normal(0, 0.01), "grad_norm": gn})
    assert [(d.detector, d.severity, d.step) for d in f.detections] == [("grad_norm_spike", "critical", 995)]
    assert f.detections[0].evidence["log_scale"] is True and f.detections[0].evidence["ratio"] > 10


@pytest.mark.parametrize("method", ["mad", "ema"])
def test_a_spike_does_not_poison_the_baseline(method):
    f = Feeder(loss={"method": method})
    clean_run(f, 860, spike_at={800: 3.0, 801: 3.0, 802: 3.0, 850: 1.6})
    spikes = [d for d in f.detections if d.detector == "loss_spike"]
    # one detection for the three-step episode, and a smaller spike soon after is still caught
    # (with the 3x values in an EMA its variance would hide it)
    assert [d.step for d in spikes] == [800, 850]
    det = f.pred.spikes["loss"]
    assert min(s for s, _ in det.window) < 800 and all(v < 4.0 for _, v in det.window)
    assert spikes[1].evidence["centre"] == pytest.approx(spikes[0].evidence["centre"], rel=0.02)


@pytest.mark.parametrize(("name", "value"), [("loss", math.nan), ("grad_norm", math.inf), ("loss", -math.inf)])
def test_nonfinite_loss_or_grad_norm_is_critical_at_once(name, value):
    f = Feeder()
    for t in range(3):
        f.feed(t, {"loss": 3.0, "grad_norm": 1.0})
    found = f.feed(3, {"loss": 3.0, "grad_norm": 1.0, name: value})
    assert [(d.detector, d.severity, d.statistic, d.step) for d in found] == [("nonfinite", "critical", name, 3)]
    assert f.feed(4, {"loss": 3.0, "grad_norm": 1.0, name: value}) == []  # same episode
    assert f.pred.risk().score >= 0.99


def test_nonfinite_per_tensor_statistic_is_a_warning():
    f = Feeder()
    found = f.feed(0, {"loss": 3.0}, stats=("grad_l2",), tensors=("w",), matrix=[[math.nan]])
    assert [(d.detector, d.severity, d.statistic) for d in found] == [("nonfinite", "warning", "w/grad_l2")]


def test_attention_logit_growth_gives_an_eta_within_20_percent():
    f = Feeder()
    rng = np.random.default_rng(1)
    k = math.log(1e4 / 20.0) / 2000  # 20 at step 0, crosses 1e4 at step 2000
    for t in range(0, 1400, 4):
        v = 20.0 * math.exp(k * t) * math.exp(rng.normal(0, 0.05))
        f.feed(t, {"loss": 3.0}, stats=("attn_logit_max",), tensors=("h.0.attn", "h.1.attn"), matrix=[[v], [15.0]])
    eta = f.pred.etas()["attn_logit"]
    truth = 2000 - 1396
    assert abs(eta - truth) <= 0.2 * truth, (eta, truth)
    top = f.pred.top_forecasts()["attn_logit"]
    assert top.layer == "h.0.attn" and "ETA to 10000" in top.message
    assert [d.layer for d in f.detections] == []  # ETA still beyond warn_eta_steps (200)
    for t in range(1400, 1900, 4):
        v = 20.0 * math.exp(k * t)
        f.feed(t, {"loss": 3.0}, stats=("attn_logit_max",), tensors=("h.0.attn", "h.1.attn"), matrix=[[v], [15.0]])
    warn = [d for d in f.detections if d.detector == "attn_logit"]
    assert [(d.severity, d.layer) for d in warn] == [("warning", "h.0.attn")]
    assert warn[0].eta_steps <= 200
    risk = f.pred.risk()
    assert risk.score > 0.7 and "attn_logit_max of h.0.attn" in risk.explanation


def test_out_rms_growth_warns_then_crosses_twice_its_baseline():
    f = Feeder(trend={"warmup_steps": 0})
    for t in range(0, 600, 5):
        growth = 1.0 if t < 200 else 1.0 + (t - 200) / 300  # flat, then linear growth to 2.3x
        f.feed(t, {"loss": 3.0}, stats=("out_rms",), tensors=MODULES, matrix=[[1.0], [1.0], [0.5 * growth], [1.0]])
    got = [(d.detector, d.severity, d.layer) for d in f.detections]
    assert ("out_rms", "critical", "h.0.mlp.c_proj") in got
    assert all(layer == "h.0.mlp.c_proj" for _, _, layer in got)
    crit = [d for d in f.detections if d.severity == "critical"][0]
    assert "early baseline" in crit.message and crit.value == pytest.approx(0.5 * (1 + (crit.step - 200) / 300))


def test_update_ratio_explanation_names_layer_growth_and_eta():
    f = Feeder(trend={"warmup_steps": 0, "every_steps": 1})  # the ETA of a fit on the last step
    k = math.log(4.0) / 50  # x4 every 50 steps
    for t in range(0, 120):
        ratios = [[1e-3 * math.exp(k * t) if name == "h.3.mlp.c_proj.weight" else 1e-3] for name in PARAMS]
        f.feed(t, {"loss": 3.0, "lr": 1e-3}, stats=("update_ratio",), tensors=PARAMS, matrix=ratios)
    top = f.pred.top_forecasts()["update_ratio"]
    assert top.layer == "h.3.mlp.c_proj.weight"
    assert re.match(
        r"update_ratio of h\.3\.mlp\.c_proj\.weight rose 3\.9× over 49 steps; ETA to 0\.1: \d+ steps", top.message
    )
    truth = math.log(0.1 / (1e-3 * math.exp(k * 119))) / k
    assert top.eta_steps == pytest.approx(truth, rel=0.05)
    spread = f.pred.top_forecasts()["update_ratio_spread"]  # 16 matrices: the norm gain and the bias are excluded
    assert spread.layer == "h.3.mlp.c_proj.weight" and spread.evidence["matrices"] == 16
    assert spread.message.startswith("update_ratio spread (max/median over 16 matrices) is ")


def test_update_ratio_during_lr_warmup_is_not_growth():
    f = Feeder(trend={"warmup_steps": 0})
    for t in range(0, 200):
        lr = 1e-5 * (t + 1)  # linear warm-up: the update ratio grows with it
        f.feed(t, {"loss": 3.0, "lr": lr}, stats=("update_ratio",), tensors=PARAMS, matrix=[[lr * 3.0]] * len(PARAMS))
    assert "update_ratio" not in f.pred.etas()


def test_sqrt_v_falling_towards_eps_and_log_z_drift():
    f = Feeder(trend={"warmup_steps": 0})
    for t in range(0, 300, 3):
        v = 1e-6 * math.exp(-t / 60)  # falls below 10 x eps = 1e-7 at step ~138
        f.feed(t, {"loss": 3.0, "log_z_mean": -0.06 * t, "adam_eps": 1e-8}, stats=("sqrt_v_rms",), tensors=("w",),
               matrix=[[v]])  # fmt: skip
    by = {d.detector: d for d in f.detections}
    assert by["adam_eps"].layer == "w" and "Adam eps 1e-08" in by["adam_eps"].message
    assert by["log_z"].severity in ("warning", "critical") and by["log_z"].statistic == "log_z_mean"


def test_missing_statistics_keep_predictors_quiet():
    f = Feeder(trend={"warmup_steps": 0})
    for t in range(300):
        f.feed(t, {"loss": 3.0, "grad_norm": 1.0}, stats=("grad_l2", "param_l2"), tensors=PARAMS,
               matrix=np.full((len(PARAMS), 2), 1.0 + t))  # fmt: skip
    assert f.detections == [] and f.pred.forecasts == {} and f.pred.etas() == {}
    assert f.pred.risk().score == 0.0


def test_rewind_forgets_the_abandoned_steps():
    f = Feeder()
    clean_run(f, 400)
    det = f.pred.spikes["loss"]
    assert max(s for s, _ in det.window) == 399
    f.pred.rewind(300)
    assert max(s for s, _ in det.window) == 299 and len(det.window) == 300 - 272


def test_fit_lines_recovers_slopes_per_column_and_ignores_masked_cells():
    x = np.arange(10.0)
    y = np.column_stack([2 * x + 1, -x, np.full(10, 5.0)])
    ok = np.ones_like(y, dtype=bool)
    y[3, 0], ok[3, 0] = 1e9, False
    slope, at_last, r2, n, t = fit_lines(x, y, ok)
    np.testing.assert_allclose(slope, [2, -1, 0], atol=1e-12)
    np.testing.assert_allclose(at_last, [19, -9, 5])
    np.testing.assert_allclose(r2, [1, 1, 0])
    np.testing.assert_array_equal(n, [9, 10, 10])
    assert np.isinf(t[0]) and t[2] == 0
    noisy = x + np.array([0.5, -0.5] * 5)
    r2_noisy, t_noisy = (
        fit_lines(x, noisy[:, None], np.ones((10, 1), bool))[2:4:1][0],
        fit_lines(x, noisy[:, None], np.ones((10, 1), bool))[4],
    )
    assert t_noisy[0] == pytest.approx(math.sqrt(r2_noisy[0] * 8 / (1 - r2_noisy[0])))


def _quiet_then(f: Feeder, stat: str, quiet: float, late: float, at: int, until: int | None = None):
    """Stationary ``stat`` rows (small noise), then one row at ``late`` from step ``at``."""
    rng = np.random.default_rng(3)
    for t in range(until or at + 1):
        rows = [[quiet * math.exp(rng.normal(0, 0.01))] for _ in MODULES]
        if t >= at:
            rows[1] = [late]
        f.feed(t, {"loss": 3.0, "lr": 1.0, "adam_eps": 1e-8}, stats=(stat,), tensors=MODULES, matrix=rows)


@pytest.mark.parametrize(
    ("stat", "quiet", "late", "detector"),
    [
        ("attn_logit_max", 30.0, 2e4, "attn_logit"),
        ("update_ratio", 1e-3, 0.5, "update_ratio"),
        ("sqrt_v_rms", 1e-3, 5e-9, "adam_eps"),
    ],
)
def test_a_value_past_its_limit_is_critical_at_its_step_between_refits(stat, quiet, late, detector):
    f = Feeder(trend={"warmup_steps": 0, "every_steps": 20})
    _quiet_then(f, stat, quiet, late, at=73)  # fits at 0, 20, 40, 60: step 73 is between two
    crit = [d for d in f.detections if d.detector == detector and d.severity == "critical"]
    assert [(d.step, d.layer) for d in crit] == [(73, MODULES[1])]


def _growing_logit(f: Feeder, steps: int = 340) -> int | None:
    """Row 1's max attention logit grows from step 100 and would reach 1e4 at step 500; returns the
    step of the predictor's first forecast."""
    k = math.log(1e4 / 30.0) / 400
    rng = np.random.default_rng(4)
    first = None
    for t in range(steps):
        rows = [[30.0 * math.exp(rng.normal(0, 0.01))] for _ in MODULES]
        rows[1] = [30.0 * math.exp(k * max(0, t - 100))]
        f.feed(t, {"loss": 3.0}, stats=("attn_logit_max",), tensors=MODULES, matrix=rows)
        if first is None and f.pred.forecasts:
            first = t
    return first


def test_a_quiet_layout_is_refitted_every_every_steps_and_a_trending_one_on_every_message(monkeypatch):
    fits = []
    real = TrendPredictors._attn_logit
    monkeypatch.setattr(
        TrendPredictors, "_attn_logit", lambda self, msg, s: fits.append(msg.step) or real(self, msg, s)
    )
    f = Feeder(trend={"warmup_steps": 0, "every_steps": 20})
    first = _growing_logit(f)
    cadence = list(fits)
    every = Feeder(trend={"warmup_steps": 0, "every_steps": 1})
    first_every = _growing_logit(every)
    assert [s for s in cadence if s < 100] == list(range(0, 100, 20))
    assert first_every <= first < first_every + 20  # a trend is first seen at most every_steps - 1 late
    assert cadence[-(340 - first) :] == list(range(first, 340))  # then refitted on every message
    warned = [(d.step, d.severity) for d in f.detections if d.detector == "attn_logit"]
    assert warned and warned == [(d.step, d.severity) for d in every.detections if d.detector == "attn_logit"]
    top = f.pred.forecasts[("attn_logit", MODULES[1])]
    assert top.step == 339 and top.eta_steps == pytest.approx(500 - 339, rel=0.05)


def test_a_quiet_layout_is_refitted_at_least_once_per_window(monkeypatch):
    fits = []
    real = TrendPredictors._attn_logit
    monkeypatch.setattr(
        TrendPredictors, "_attn_logit", lambda self, msg, s: fits.append(msg.step) or real(self, msg, s)
    )
    f = Feeder(trend={"warmup_steps": 0, "every_steps": 20, "window": 8})
    _quiet_then(f, "attn_logit_max", 30.0, 30.0, at=0, until=40)
    assert fits == list(range(0, 40, 8))  # every_steps above the window counts as the window
