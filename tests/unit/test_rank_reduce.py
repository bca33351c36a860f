"""Job-level scalars (sentinel/rank_reduce.py) and what the agent makes of them: a NaN or a spike on
one rank, sent by rank 0 as ``loss_max``/``loss_max_rank``, is a detection that names that rank."""

from __future__ import annotations

import math

import numpy as np
import torch
from test_predict import Feeder

from agent.policy import Policy, PolicyConfig
from sentinel.rank_reduce import SCALARS, job_scalars


def _table(losses, seconds, errors=None, given=None) -> torch.Tensor:
    n = len(losses)
    given = [1.0] * n if given is None else given
    errors = [0.0] * n if errors is None else errors
    return torch.tensor(list(zip(losses, given, seconds, errors)), dtype=torch.float32)


def test_job_scalars_name_the_first_nonfinite_rank_and_the_slowest() -> None:
    out = {k: float(v) for k, v in job_scalars(_table([1.0, math.nan, 2.0, math.inf], [0.1, 0.1, 0.9, 0.2])).items()}
    assert set(out) == set(SCALARS)
    assert math.isnan(out["loss_max"]) and math.isnan(out["loss_mean"])
    assert out["loss_max_rank"] == 1 and out["loss_nonfinite_ranks"] == 2
    assert out["step_seconds_max_rank"] == 2 and out["step_seconds_max"] == np.float32(0.9)
    assert out["step_seconds_min"] == np.float32(0.1)


def test_job_scalars_skip_ranks_without_a_loss_and_find_the_largest() -> None:
    out = job_scalars(_table([1.0, 4.0, 99.0], [0.1, 0.2, 0.3], errors=[0, 3, 1], given=[1, 1, 0]))
    out = {k: float(v) for k, v in out.items()}
    assert (out["loss_min"], out["loss_mean"], out["loss_max"], out["loss_max_rank"]) == (1.0, 2.5, 4.0, 1)
    assert out["loss_nonfinite_ranks"] == 0 and (out["errors_max"], out["errors_max_rank"]) == (3, 1)
    assert "loss_max" not in job_scalars(_table([0.0], [0.1], given=[0]), with_loss=False)


def test_a_nan_on_rank_1_is_a_critical_nonfinite_detection_naming_it() -> None:
    f = Feeder()
    f.feed(0, {"loss": 2.0, "loss_max": 2.1, "loss_max_rank": 1.0, "loss_nonfinite_ranks": 0.0})
    found = f.feed(1, {"loss": 2.0, "loss_max": math.nan, "loss_max_rank": 1.0, "loss_nonfinite_ranks": 1.0})
    assert [(d.detector, d.severity, d.statistic) for d in found] == [("nonfinite", "critical", "loss")]
    d = found[0]
    assert d.evidence["rank"] == 1 and d.evidence["statistic"] == "loss_max"
    assert "on rank 1" in d.message
    decision = Policy(PolicyConfig()).decide(d)
    assert decision is not None and decision.action == "rollback" and "on rank 1" in decision.commands[0].reason
    assert f.feed(2, {"loss": 2.0, "loss_max": math.nan, "loss_max_rank": 1.0, "loss_nonfinite_ranks": 1.0}) == []
    f.feed(3, {"loss": 2.0, "loss_max": 2.1, "loss_max_rank": 0.0, "loss_nonfinite_ranks": 0.0})
    again = f.feed(4, {"loss": 2.0, "loss_max": math.inf, "loss_max_rank": 0.0, "loss_nonfinite_ranks": 2.0})
    assert len(again) == 1 and "on rank 0 (non-finite on 2 ranks)" in again[0].message  # a new episode


def test_a_loss_spike_on_one_rank_is_seen_in_the_maximum_and_attributed() -> None:
    f = Feeder()
    rng = np.random.default_rng(0)
    for t in range(100):
        losses = 3.0 + rng.normal(0, 0.02, 8)
        f.feed(t, {"loss": float(losses[0]), "loss_max": float(losses.max()), "loss_max_rank": float(losses.argmax())})
    losses = 3.0 + rng.normal(0, 0.02, 8)
    losses[5] = 6.5  # rank 5 alone: the mean over 8 ranks rises by 15%, the maximum doubles
    found = f.feed(100, {"loss": float(losses[0]), "loss_max": 6.5, "loss_max_rank": 5.0})
    spikes = [d for d in found if d.detector == "loss_spike"]
    assert len(spikes) == 1 and spikes[0].severity == "critical", found
    assert spikes[0].evidence["rank"] == 5 and spikes[0].message.startswith("loss of rank 5 (the largest over ranks)")


def test_without_job_level_scalars_the_loss_itself_is_scored() -> None:
    f = Feeder()
    for t in range(100):
        f.feed(t, {"loss": 3.0 + 0.01 * (t % 3)})
    found = [d for d in f.feed(100, {"loss": 9.0}) if d.detector == "loss_spike"]
    assert len(found) == 1 and "rank" not in found[0].evidence and found[0].message.startswith("loss 9")


def test_a_single_process_has_no_reduction_and_sends_no_job_level_scalar() -> None:
    import sentinel

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sn = sentinel.attach(model, optimizer, publish={"enabled": True, "insecure": True}, control={"enabled": False})
    try:
        assert sn.job is None
        layouts = []
        sn.publisher.publish = lambda step, layout, data: layouts.append(layout) or True
        loss = model(torch.randn(2, 4)).square().mean()
        loss.backward()
        optimizer.step()
        sn.observe(loss=loss)
        assert layouts and "loss" in layouts[-1].scalars
        assert not set(SCALARS) & set(layouts[-1].scalars)
    finally:
        sn.close()


def test_a_loss_that_is_not_one_number_is_left_out_not_taken_for_a_nan() -> None:
    from sentinel.rank_reduce import RankReduce

    job = RankReduce(torch.device("cpu"), rank=0, world=1, group=None)
    row = job._row(torch.ones(3), 0.25, 2)  # per-sample losses by mistake
    assert row.tolist() == [0.0, 0.0, 0.25, 2.0] and job.failed_loss
    assert job._row(torch.tensor(1.5), 0.25, 0).tolist() == [1.5, 1.0, 0.25, 0.0]
