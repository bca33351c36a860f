"""Predictors on synthetic series: quiet on noise, loud on spikes and NaN, one table, one episode per mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from agent_proc import make_frames

from agent.history import SeriesHistory
from agent.policy import Rule
from agent.predict import DETECTORS, PREDICTORS, PredictConfig, SeriesPredictor, fit_lines
from agent.protocol import decode
from agent.typedconfig import build, reference

LAYOUTS: dict = {}
PARAMS = tuple(f"h.{i}.{m}.weight" for i in range(4) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
PARAMS += ("h.0.ln_1.weight", "h.0.attn.c_attn.bias")
ROLES = ("qkv", "o", "up", "down") * 4 + ("norm", "bias")
MODULES = ("h.0.attn", "h.1.attn", "h.0.mlp.c_proj", "h.1.mlp.c_proj")


def message(step, scalars, stats=(), tensors=(), matrix=None, roles=()):
    frames = make_frames(step=step, scalars=scalars, stats=stats, tensors=tensors, matrix=matrix, roles=roles)
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

    def by(self, detector: str):
        return [d for d in self.detections if d.detector == detector]


def predictor(f: Feeder, name: str):
    return next(p for p in f.pred.predictors if p.name == name)


def clean_run(feeder: Feeder, steps: int, seed: int = 0, spike_at: dict | None = None, probes_every: int = 10):
    """A healthy run: loss decays with noise, grad norm log-normal with single-step bursts, stationary
    per-tensor stats (every step) and probes (every ``probes_every`` steps)."""
    rng = np.random.default_rng(seed)
    spike_at = spike_at or {}
    norms = np.exp(rng.normal(0, 0.05, len(PARAMS))) * 5.0
    for t in range(steps):
        loss = 2.5 + 2.0 * math.exp(-t / 400) + rng.normal(0, 0.03)
        loss *= spike_at.get(t, 1.0)
        burst = 4.0 if rng.random() < 0.01 else 1.0  # routine single-step gradient bursts
        scalars = {"loss": loss, "grad_norm": float(np.exp(rng.normal(0, 0.25))) * burst, "lr": 3e-4,
                   "adam_eps": 1e-8}  # fmt: skip
        update = 3e-4 * np.exp(rng.normal(0, 0.2, len(PARAMS)))
        new_norms = norms + rng.uniform(-0.5, 0.5, len(PARAMS)) * update * norms
        param_stats = np.column_stack(
            [
                update,
                1e-3 * np.exp(rng.normal(0, 0.2, len(PARAMS))),
                1e-3 * np.exp(rng.normal(0, 0.2, len(PARAMS))),
                norms,
                update * norms,
            ]  # fmt: skip
        )
        norms = new_norms
        feeder.feed(t, scalars, stats=("update_ratio", "grad_rms", "sqrt_v_rms", "param_l2", "update_l2"),
                    tensors=PARAMS, matrix=param_stats, roles=ROLES)  # fmt: skip
        if t % probes_every == 0:
            probes = np.column_stack(
                [30 * np.exp(rng.normal(0, 0.1, len(MODULES))), 1.0 * np.exp(rng.normal(0, 0.1, len(MODULES)))]
            )
            feeder.feed(t, {"log_z_mean": rng.normal(0, 0.3)}, stats=("attn_logit_max", "out_rms"), tensors=MODULES,
                        matrix=probes)  # fmt: skip


@pytest.mark.parametrize("probes_every", [1, 10])
def test_clean_noisy_run_gives_no_detection_over_2000_steps(probes_every):
    f = Feeder(out_rms={"enabled": True})
    clean_run(f, 2000, probes_every=probes_every)
    assert f.detections == []
    assert f.pred.risk().score < 0.2
    assert f.pred.forecasts == {}


def test_every_predictor_of_the_table_has_its_detector_name_and_config_section():
    assert tuple(p.name for p in PREDICTORS) == DETECTORS and len(set(DETECTORS)) == len(DETECTORS)
    keys = {k.split(".")[0] for k, *_ in reference(PredictConfig)}
    assert {p.key for p in PREDICTORS} <= keys
    cfg = build(PredictConfig, {p.key: {"enabled": False} for p in PREDICTORS})
    assert SeriesPredictor("r", 0, cfg).predictors == []
    for name in DETECTORS:
        Rule(detector=name)  # every detector can be named in a policy rule


@pytest.mark.parametrize("method", ["mad", "ema"])
def test_three_times_loss_jump_is_detected_at_that_step(method):
    f = Feeder(loss={"method": method})
    clean_run(f, 1000, spike_at={990: 3.0})
    spikes = f.by("loss_spike")
    assert [(d.step, d.severity) for d in spikes] == [(990, "critical")]
    d = spikes[0]
    assert d.statistic == "loss" and 2.5 < d.evidence["ratio"] < 3.5 and d.evidence["z"] > 6
    assert "loss" in d.message and "step 990" in d.message
    assert f.pred.risk().score >= 0.9 and "loss_spike" in f.pred.risk().explanation


def _grad_norms(f: Feeder, spikes: dict[int, float]) -> None:
    rng = np.random.default_rng(3)
    for t in range(1000):
        gn = float(np.exp(rng.normal(0, 0.25))) * spikes.get(t, 1.0)
        f.feed(t, {"loss": 3.0 + rng.normal(0, 0.01), "grad_norm": gn})


def test_a_single_step_gradient_spike_is_not_a_detection_but_two_in_a_row_are():
    single = Feeder()
    _grad_norms(single, {995: 12.0})
    assert single.detections == []
    twice = Feeder()
    _grad_norms(twice, {995: 12.0, 996: 12.0})
    assert [(d.detector, d.severity, d.step) for d in twice.detections] == [("grad_norm_spike", "critical", 996)]
    d = twice.detections[0]
    assert d.evidence["log_scale"] is True and d.evidence["ratio"] > 10 and d.evidence["consecutive"] == 2
    once = Feeder(grad_norm={"min_consecutive": 1})
    _grad_norms(once, {995: 12.0})
    assert [d.step for d in once.detections] == [995]


@pytest.mark.parametrize("method", ["mad", "ema"])
def test_a_spike_does_not_poison_the_baseline(method):
    f = Feeder(loss={"method": method})
    clean_run(f, 860, spike_at={800: 3.0, 801: 3.0, 802: 3.0, 850: 1.6})
    spikes = f.by("loss_spike")
    # one detection for the three-step episode, and a smaller spike soon after is still caught
    # (with the 3x values in an EMA its variance would hide it)
    assert [d.step for d in spikes] == [800, 850]
    det = predictor(f, "loss_spike").detector
    assert min(s for s, _ in det.window) < 800 and all(v < 4.0 for _, v in det.window)
    assert spikes[1].evidence["centre"] == pytest.approx(spikes[0].evidence["centre"], rel=0.02)


@pytest.mark.parametrize(("name", "value"), [("loss", math.nan), ("grad_norm", math.inf), ("loss", -math.inf)])
def test_nonfinite_loss_or_grad_norm_is_critical_once_per_episode(name, value):
    f = Feeder()
    for t in range(3):
        f.feed(t, {"loss": 3.0, "grad_norm": 1.0})
    found = f.feed(3, {"loss": 3.0, "grad_norm": 1.0, name: value})
    assert [(d.detector, d.severity, d.statistic, d.step) for d in found] == [("nonfinite", "critical", name, 3)]
    for t in range(4, 30):  # the probes' own messages (no loss) in between neither end nor repeat the episode
        assert f.feed(t, {"loss": 3.0, "grad_norm": 1.0, name: value}) == []
        assert (
            f.feed(t, {"log_z_mean": math.nan}, stats=("attn_logit_max",), tensors=("h.0.attn",), matrix=[[1.0]]) == []
        )
    assert f.pred.risk().score >= 0.7
    f.feed(30, {"loss": 3.0, "grad_norm": 1.0})
    assert [d.step for d in f.feed(31, {"loss": 3.0, "grad_norm": 1.0, name: value})] == [31]  # a new episode


def test_nonfinite_per_tensor_statistic_is_a_warning():
    f = Feeder()
    found = f.feed(0, {"loss": 3.0}, stats=("grad_l2",), tensors=("w",), matrix=[[math.nan]])
    assert [(d.detector, d.severity, d.statistic) for d in found] == [("nonfinite", "warning", "w/grad_l2")]


def test_missing_statistics_keep_predictors_quiet():
    f = Feeder()
    for t in range(300):
        f.feed(t, {"loss": 3.0, "grad_norm": 1.0}, stats=("grad_l2",), tensors=PARAMS,
               matrix=np.full((len(PARAMS), 1), 1.0 + t))  # fmt: skip
    assert f.detections == [] and f.pred.forecasts == {} and f.pred.etas() == {}
    assert f.pred.risk().score == 0.0


def test_rewind_forgets_the_abandoned_steps():
    f = Feeder()
    clean_run(f, 400)
    det = predictor(f, "loss_spike").detector
    assert max(s for s, _ in det.window) == 399
    f.pred.rewind(300)
    assert max(s for s, _ in det.window) == 299 and len(det.window) == 300 - 272


def test_many_layers_reaching_a_limit_together_are_one_detection_naming_them():
    f = Feeder()
    for t in range(40):
        v = 30.0 if t < 30 else 2e4
        f.feed(t, {"loss": 3.0}, stats=("attn_logit_max",), tensors=MODULES, matrix=[[v]] * 4)
    crit = f.by("attn_logit")
    assert len(crit) == 1 and crit[0].step == 30 and crit[0].severity == "critical"
    assert crit[0].evidence["layer_count"] == 4 and sorted(crit[0].evidence["layers"]) == sorted(MODULES)
    assert "(and 3 more layer(s))" in crit[0].message
    assert len(f.pred.forecasts) == 4  # the status page still sees every layer


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
    _, _, r2_noisy, _, t_noisy = fit_lines(x, noisy[:, None], np.ones((10, 1), bool))
    assert t_noisy[0] == pytest.approx(math.sqrt(r2_noisy[0] * 8 / (1 - r2_noisy[0])))
