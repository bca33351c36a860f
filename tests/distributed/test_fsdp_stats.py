"""Two ranks on gloo: FSDP2-sharded statistics equal those of the same model unsharded and under DDP.

Real pieces only: two processes (this file run as a script) in a gloo process group; on each,
the tiny GPT (float64) three times from the same initial weights: sharded with FSDP2 (as
examples/torchrun_fsdp.py does, one embedding with an uneven split), wrapped in DDP, and plain
on the whole global batch.  Each has its own sentinel.  CommDebugMode counts the collectives
inside ``optimizer.step()``.  Rank 1's statistics fail on purpose at step 4: neither rank may
hang, and both must turn statistics off at the next statistics step.  Then a DCP checkpoint of the sharded model is saved, training moves on,
and the restore must bring back every shard of the parameters and of Adam's state.  Last,
examples/torchrun_fsdp.py's training function runs 4 steps, then resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
STEPS, EVERY, FAIL_AT = 8, 2, 4  # statistics at steps 0, 2, 4, 6; rank 1 fails at 4, all turn them off at 6


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fsdp_state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    tensors = [p.full_tensor() for p in model.parameters()]
    for p in model.parameters():
        tensors += [optimizer.state[p][k].full_tensor() for k in ("exp_avg", "exp_avg_sq")]
    return _digest(tensors)


def _worker(rank: int, port: int, out_dir: str, ckpt_dir: str) -> None:
    import logging

    import torch.distributed as dist
    from sentinel.examples.tiny_gpt import GPT, GPTConfig
    from sentinel.examples.torchrun_fsdp import sharded_gpt
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    import sentinel

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=15)  # wpe: 15 rows, shards of 8 and 7
    cpu = torch.device("cpu")
    fsdp = sharded_gpt(cfg, cpu, seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    single = GPT(cfg).double()
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(GPT(cfg).double())
    sgd_fsdp = sharded_gpt(cfg, cpu, seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    sgd_single = GPT(cfg).double()
    assert all(isinstance(p, DTensor) for p in fsdp.parameters())
    tokens = torch.randint(0, 256, (STEPS, 4, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    common = {"publish": {"enabled": False}, "control": {"enabled": False}, "stats": {"every": EVERY}}
    runs = {}
    models = {"fsdp": fsdp, "ddp": ddp, "single": single, "sgd_fsdp": sgd_fsdp, "sgd_single": sgd_single}
    for name, model in models.items():
        if name.startswith("sgd"):  # not Adam: the update is measured from a copy of the (local) parameters
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=3e-4)
        ckpt = {"checkpoint": {"dir": ckpt_dir}} if name == "fsdp" else {}
        runs[name] = (model, opt, sentinel.attach(model, opt, run=name, **common, **ckpt))
    report: dict = {"rank": rank, "stats": {n: [] for n in runs}, "collectives": {n: [] for n in runs}, "oracle": []}
    report["names"] = {n: list(sn._names) for n, (_, _, sn) in runs.items()}
    report["stat_names"] = list(runs["fsdp"][2].stats.stats)
    report["placements"] = [str(p.placements) for p in fsdp.parameters()]
    report["local_rows"] = [p.to_local().shape[0] for p in fsdp.parameters()]
    for step in range(STEPS):
        x, y = tokens[step, :, :-1], tokens[step, :, 1:]
        for name, (model, opt, sn) in runs.items():
            mine = slice(None) if "single" in name else slice(2 * rank, 2 * rank + 2)
            _, loss = model(x[mine], y[mine])
            loss.backward()
            if name == "fsdp":
                before = [p.full_tensor() for p in model.parameters()]
                if step == FAIL_AT and rank == 1:
                    sn.stats._local_norms = lambda dtype: 1 / 0
            with CommDebugMode() as comm:
                opt.step()
            report["collectives"][name].append(comm.get_total_counts())
            if name == "fsdp" and step % EVERY == 0:
                after = [p.full_tensor() for p in model.parameters()]
                ratio = [((a - b).norm() / b.norm()).item() if b.norm() > 0 else 0.0 for a, b in zip(after, before)]
                report["oracle"].append(ratio)  # sentinel's convention: 0 for an all-zero W (a zero-initialised bias)
            if sn._pending is not None:
                report["stats"][name].append(sn._pending[0].tolist())
            opt.zero_grad(set_to_none=True)
            sn.observe(loss=loss)

    model, opt, sn = runs["fsdp"]
    saved = sn.checkpoints.save()
    report["saved"] = str(saved)
    at_save = _fsdp_state_digest(model, opt)
    for step in range(2):
        model(tokens[step, :, :-1], tokens[step, :, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sn.observe()
    moved = _fsdp_state_digest(model, opt)
    report["restored_step"] = sn.checkpoints.restore(saved)
    report["digests"] = {"saved": at_save, "moved": moved, "restored": _fsdp_state_digest(model, opt)}
    for _, _, s in runs.values():
        s.close()

    from sentinel.examples.torchrun_fsdp import parse_args, train

    config = Path(out_dir) / "sentinel.yaml"
    config.write_text("publish: {enabled: false}\ncontrol: {enabled: false}\n")
    argv = ["--n-layer", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--config", str(config)]
    argv += ["--checkpoint-dir", str(Path(out_dir) / "example"), "--checkpoint-every", "2"]
    first = train(parse_args([*argv, "--steps", "4"]), cpu)
    report["example"] = {"first": first, "resumed": train(parse_args([*argv, "--steps", "6"]), cpu)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path

    tmp = tmp_path_factory.mktemp("fsdp")
    with Ranks(HERE, tmp, tmp / "ckpt", log_dir=tmp, cwd=ROOT) as ranks:
        codes = ranks.wait(120)
    text = ranks.log()
    assert codes == [0, 0], text
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)], text


def _stats_steps(report: dict, name: str) -> torch.Tensor:
    return torch.tensor(report["stats"][name], dtype=torch.float64)


def test_parameters_are_sharded_unevenly_on_dim_0(reports: tuple[list[dict], str]) -> None:
    r0, r1 = reports[0]
    assert all(p == "(Shard(dim=0),)" for p in r0["placements"])
    wpe = r0["names"]["fsdp"].index("wpe.weight")
    assert (r0["local_rows"][wpe], r1["local_rows"][wpe]) == (8, 7)


def test_sharded_statistics_equal_unsharded_and_ddp(reports: tuple[list[dict], str]) -> None:
    r0, r1 = reports[0]
    assert r0["names"]["fsdp"] == r0["names"]["single"] == [n.removeprefix("module.") for n in r0["names"]["ddp"]]
    good = slice(0, FAIL_AT // EVERY)  # statistics steps before the injected failure
    for r in (r0, r1):
        fsdp, ddp, single = (_stats_steps(r, n) for n in ("fsdp", "ddp", "single"))
        assert ddp.shape == single.shape == (STEPS // EVERY, len(r["names"]["single"]), 7)
        assert fsdp.shape == (FAIL_AT // EVERY + 1, *single.shape[1:])  # off after the failure
        torch.testing.assert_close(fsdp[good], single[good], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(ddp, single, rtol=1e-5, atol=1e-10)
    assert r0["stats"]["fsdp"][: FAIL_AT // EVERY] == r1["stats"]["fsdp"][: FAIL_AT // EVERY]  # same on every rank
    for r in (r0, r1):
        sgd_fsdp, sgd_single = _stats_steps(r, "sgd_fsdp"), _stats_steps(r, "sgd_single")
        assert sgd_fsdp.shape == (STEPS // EVERY, len(r["names"]["single"]), 5)  # no Adam columns
        torch.testing.assert_close(sgd_fsdp, sgd_single, rtol=1e-5, atol=1e-10)

    cols = r0["stat_names"]
    assert cols == [
        "grad_l2",
        "grad_rms",
        "param_l2",
        "update_l2",
        "update_ratio",
        "sqrt_v_rms",
        "sqrt_v_below_eps_fraction",
    ]
    fsdp = _stats_steps(r0, "fsdp")
    oracle = torch.tensor(r0["oracle"], dtype=torch.float64)
    torch.testing.assert_close(fsdp[good, :, cols.index("update_ratio")], oracle[good], rtol=1e-5, atol=0)
    below = fsdp[good, :, cols.index("sqrt_v_below_eps_fraction")]
    assert ((below > 0) & (below < 1)).any(), "the count below eps is never partial: the test does not exercise it"


def test_one_collective_on_statistics_steps_and_none_otherwise(reports: tuple[list[dict], str]) -> None:
    for r in reports[0]:
        assert r["collectives"]["fsdp"] == [int(s % EVERY == 0 and s <= FAIL_AT) for s in range(STEPS)]
        assert r["collectives"]["sgd_fsdp"] == [int(s % EVERY == 0) for s in range(STEPS)]
        assert r["collectives"]["ddp"] == r["collectives"]["single"] == r["collectives"]["sgd_single"] == [0] * STEPS


def test_a_failure_on_one_rank_turns_statistics_off_on_every_rank(reports: tuple[list[dict], str]) -> None:
    (r0, r1), text = reports
    for r in (r0, r1):
        assert torch.tensor(r["stats"]["fsdp"][FAIL_AT // EVERY]).isnan().all()
    assert "rank1 sentinel: statistics failed after the step on this rank" in text
    assert "rank0 sentinel: statistics failed" not in text
    for rank in (0, 1):
        assert f"rank{rank} sentinel: stats.before_step failed at step {FAIL_AT + EVERY}; now off" in text
    assert text.count("statistics failed on 1 rank(s) at the previous statistics step") == 2


def test_dcp_checkpoint_restores_every_shard(reports: tuple[list[dict], str]) -> None:
    r0, r1 = reports[0]
    assert r0["saved"].endswith(f"step-{STEPS}") and r0["restored_step"] == r1["restored_step"] == STEPS
    for r in (r0, r1):
        assert r["digests"]["restored"] == r["digests"]["saved"] != r["digests"]["moved"]
    assert r0["digests"] == r1["digests"]


def test_the_example_resumes_from_its_dcp_checkpoint(reports: tuple[list[dict], str]) -> None:
    for r in reports[0]:
        first, resumed = r["example"]["first"], r["example"]["resumed"]
        assert first["resumed"] is None and first["step"] == 4 and len(first["losses"]) == 4
        assert resumed["resumed"] == 2 and resumed["step"] == 6 and len(resumed["losses"]) == 4  # step-4 not yet good
        torch.testing.assert_close(resumed["losses"][:2], first["losses"][2:], rtol=1e-6, atol=0)  # steps 2 and 3 again
    assert reports[0][0]["example"]["first"]["losses"] != reports[0][1]["example"]["first"]["losses"]  # own batches


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("ckpt_dir")
    a = parser.parse_args()
    _worker(a.rank, a.port, a.out_dir, a.ckpt_dir)
