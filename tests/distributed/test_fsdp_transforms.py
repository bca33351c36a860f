"""The four optimizer transforms on sharded parameters equal the same model unsharded.

Real pieces only: gloo process groups on loopback, this file run as a script once per rank.
Each configuration trains the tiny GPT (float64) twice from the same initial weights for 20
steps: sharded, and plain on the whole global batch in the same process, each with its own
sentinel.  Layouts: FSDP2 on 2 ranks (``fully_shard``, Shard(0), the position embedding split
8/7); tensor parallel on 2 ranks (``parallelize_module``, every MLP's ``c_fc`` column-wise and
``c_proj`` row-wise, the rest plain tensors); and, on 4 ranks, a 2-D mesh (data-parallel
FSDP2 x tensor parallel).  Parameters must agree within 1e-5 after 20 steps, the transforms'
own state (gates, ε scales, clamp and guard counters) must agree and be the same on every rank,
and ``CommDebugMode`` counts the collectives inside ``optimizer.step()``.  The FSDP2 run of all
four transforms together also saves a DCP checkpoint, trains on and restores it.
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
STEPS, SPIKE = 20, 12  # the loss is multiplied by 1e4 at SPIKE where the guard is on: it skips or clips that update

GUARD_SKIP = {"guard": {"enabled": True, "action": "skip", "z": 4.0, "warmup": 5}}
GUARD_CLIP = {"guard": {"enabled": True, "action": "clip", "z": 1.0, "warmup": 3}}
WESAR = {"wesar": {"enabled": True}}
EPS = {"eps": {"enabled": True, "every": 3}}
CLAMP = {"clamp": {"enabled": True, "default": 2e-3}}
HOOK = {"fused": "off"}  # the transforms around torch's own step (the default, 'auto', is the fused pass)
# name: (optim config, other sentinel config, learning rate).  WeSaR's own init draws every W with
# σ = 0.006, so lr 1e-2 moves each weight by more than itself per step: there float64 rounding
# differences (1e-14 after step 0) grow chaotically in any two runs; lr 1e-3 keeps that run tame.
CONFIGS = {
    "none": ({}, {}, 1e-2),  # no transform: how close the layout's own training is
    "guard": (GUARD_SKIP, {}, 1e-2),
    "wesar": ({**WESAR, **HOOK}, {}, 1e-2),
    "wesar_init": ({"wesar": {"enabled": True, "init": "wesar"}, **HOOK}, {}, 1e-3),
    "eps": ({**EPS, **HOOK}, {}, 1e-2),
    "clamp": ({**CLAMP, **HOOK}, {}, 1e-2),
    "all": ({**GUARD_CLIP, **WESAR, **EPS, **CLAMP, **HOOK}, {"stats": {"enabled": True, "every": 2}}, 1e-2),
    "fused": ({**GUARD_CLIP, **WESAR, **EPS, **CLAMP, "fused": "auto"}, {"stats": {"enabled": True, "every": 2}}, 1e-2),
}
ALONE = ["none", "guard", "wesar", "wesar_init", "eps"]
TOGETHER = ["clamp", "all", "fused"]
# two FSDP2 layouts of the same sharding, so that each test's ranks run for well under a minute
LAYOUT_CONFIGS = {"fsdp": ALONE, "fsdp-all": TOGETHER, "tp": ["all", "fused"], "2d": ["all"]}


def _worker(rank: int, port: int, out_dir: str, layout: str) -> None:
    import logging

    import torch.distributed as dist
    from sentinel.examples.tiny_gpt import GPT, GPTConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import sentinel

    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
    torch.set_num_threads(1)
    world = 4 if layout == "2d" else 2
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=15, vocab_size=64)  # wpe: 15 rows, 8 + 7
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")) if layout == "2d" else None
    fsdp = layout.startswith("fsdp")
    dp_rank = rank if fsdp else mesh.get_local_rank("dp") if mesh is not None else 0
    n_dp = 1 if layout == "tp" else 2

    def sharded() -> torch.nn.Module:
        torch.manual_seed(0)
        model = GPT(cfg).double()
        if layout in ("tp", "2d"):
            tp = mesh["tp"] if mesh is not None else init_device_mesh("cpu", (2,))
            for block in model.h:
                parallelize_module(block.mlp, tp, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
        if fsdp or layout == "2d":
            dp = mesh["dp"] if mesh is not None else None
            for block in model.h:
                fully_shard(block, mesh=dp)
            fully_shard(model, mesh=dp)
        return model

    def full(p: torch.Tensor) -> torch.Tensor:
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()

    tokens = torch.randint(
        0, cfg.vocab_size, (STEPS, 4, cfg.block_size + 1), generator=torch.Generator().manual_seed(1)
    )
    per = 4 // n_dp
    report: dict = {"rank": rank, "runs": {}}
    for name in LAYOUT_CONFIGS[layout]:
        optim, extra, lr = CONFIGS[name]
        common = {"publish": {"enabled": False}, "control": {"enabled": False}, "stats": {"enabled": False}}
        common["log_level"] = "warning"
        runs = {}
        for kind in ("sharded", "single"):
            if kind == "sharded":
                model = sharded()
            else:
                torch.manual_seed(0)
                model = GPT(cfg).double()
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, eps=1e-3)
            conf = {**common, **extra, "optim": optim}
            if kind == "sharded" and name == "all" and fsdp:
                conf["checkpoint"] = {"dir": str(Path(out_dir) / "ckpt")}
            torch.manual_seed(5)  # WeSaR's 'wesar' init draws from the global generator
            runs[kind] = (model, opt, sentinel.attach(model, opt, run=f"{name}-{kind}", **conf))
        rec: dict = {"collectives": []}
        spike = "guard" in optim
        for step in range(STEPS):
            x, y = tokens[step, :, :-1], tokens[step, :, 1:]
            for kind, (model, opt, sn) in runs.items():
                mine = slice(None) if kind == "single" else slice(per * dp_rank, per * dp_rank + per)
                _, loss = model(x[mine], y[mine])
                (loss * (1e4 if spike and step == SPIKE else 1.0)).backward()
                with CommDebugMode() as comm:
                    opt.step()
                if kind == "sharded":
                    rec["collectives"].append(comm.get_total_counts())
                opt.zero_grad(set_to_none=True)
                sn.observe(loss=loss)
        (ms, _, ss), (mu, _, _) = runs["sharded"], runs["single"]
        diffs = {
            n: (full(p) - q.detach()).abs().max().item() for (n, p), q in zip(ms.named_parameters(), mu.parameters())
        }
        rec["max_param_diff"] = max(diffs.values())
        rec["worst"] = max(diffs, key=diffs.get)
        rec["placements"] = sorted({str(p.placements) for p in ms.parameters() if isinstance(p, DTensor)})
        rec["plain"] = sum(not isinstance(p, DTensor) for p in ms.parameters())
        rec["fused"] = {k: runs[k][2].chain.fused is not None for k in runs}
        rec["transforms"] = {k: sorted(runs[k][2].chain.transforms) for k in runs}
        rec["state"] = {k: _transform_state(runs[k][2]) for k in runs}
        if ss.checkpoints is not None:
            rec["checkpoint"] = _checkpoint_round_trip(ms, runs["sharded"][1], ss, tokens, full)
        report["runs"][name] = rec
        for _, _, sn in runs.values():
            sn.close()
    (Path(out_dir) / f"{layout}-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _transform_state(sn: object) -> dict:
    t = sn.chain.transforms
    out = {"skips": t["guard"].skips, "clips": t["guard"].clips}
    if "wesar" in t:
        out["gates"] = t["wesar"].gates.tolist()
    if "eps" in t:
        out["eps_scale"] = t["eps"].scale.tolist()
    if "clamp" in t:
        out["clamp_events"] = int(t["clamp"].events)
    return out


def _checkpoint_round_trip(model, opt, sn, tokens, full) -> dict:
    """Save (DCP), train 2 more steps, restore: parameters, Adam state and the transforms' state come back."""

    def digest() -> str:
        h = hashlib.sha256()
        for p in model.parameters():
            for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
                h.update(full(t).contiguous().numpy().tobytes())
        h.update(json.dumps(_transform_state(sn), sort_keys=True).encode())
        return h.hexdigest()

    saved = sn.checkpoints.save()
    at_save = digest()
    for step in range(2):
        model(tokens[step, :2, :-1], tokens[step, :2, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sn.observe()
    moved = digest()
    restored_step = sn.checkpoints.restore(saved)
    return {"saved": at_save, "moved": moved, "restored": digest(), "step": restored_step}


def _run(tmp_path_factory: pytest.TempPathFactory, layout: str, n: int) -> tuple[list[dict], str]:
    from ranks import Ranks  # not at the top: the workers run this file without tests/ on their path

    tmp = tmp_path_factory.mktemp(layout)
    with Ranks(HERE, tmp, layout, log_dir=tmp, n=n, cwd=ROOT) as ranks:
        codes = ranks.wait(240)
    text = ranks.log()
    assert codes == [0] * n, text[-8000:]
    return [json.loads((tmp / f"{layout}-rank{r}.json").read_text()) for r in range(n)], text


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    return _run(tmp_path_factory, "fsdp", 2)


@pytest.fixture(scope="module")
def fsdp_all(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    return _run(tmp_path_factory, "fsdp-all", 2)


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    return _run(tmp_path_factory, "tp", 2)


@pytest.fixture(scope="module")
def mesh2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    return _run(tmp_path_factory, "2d", 4)


def _check_equal(reports: list[dict], names: list[str]) -> None:
    for name in names:
        for r in reports:
            rec = r["runs"][name]
            assert rec["max_param_diff"] < 1e-5, (name, rec["worst"], rec["max_param_diff"])
            assert rec["transforms"]["sharded"] == rec["transforms"]["single"], name
            sharded, single = rec["state"]["sharded"], rec["state"]["single"]
            assert sharded.keys() == single.keys()
            for key in sharded:
                torch.testing.assert_close(
                    torch.tensor(sharded[key], dtype=torch.float64),
                    torch.tensor(single[key], dtype=torch.float64),
                    rtol=1e-6,
                    atol=0,
                    msg=f"{name} {key}",
                )
        assert all(r["runs"][name]["state"] == reports[0]["runs"][name]["state"] for r in reports), name


def test_fsdp2_each_transform_alone_equals_unsharded(fsdp: tuple[list[dict], str]) -> None:
    reports, _ = fsdp
    r0 = reports[0]["runs"]
    assert r0["guard"]["placements"] == ["(Shard(dim=0),)"] and r0["guard"]["plain"] == 0
    _check_equal(reports, ALONE)
    # each configuration acted, so equality is not that of two runs where nothing happened
    assert r0["guard"]["state"]["single"]["skips"] == 1  # the spike at SPIKE
    assert max(r0["eps"]["state"]["single"]["eps_scale"]) > 1
    assert len(set(r0["wesar"]["state"]["single"]["gates"])) > 1


def test_fsdp2_clamp_all_four_and_the_fused_step_equal_unsharded(fsdp_all: tuple[list[dict], str]) -> None:
    reports, _ = fsdp_all
    r0 = reports[0]["runs"]
    _check_equal(reports, TOGETHER)
    assert r0["all"]["state"]["single"]["clips"] > 0 and r0["fused"]["state"]["single"]["clips"] > 0
    assert r0["clamp"]["state"]["single"]["clamp_events"] > 0 and r0["all"]["state"]["single"]["clamp_events"] > 0
    assert r0["fused"]["fused"] == {"sharded": True, "single": True}


def test_fsdp2_transforms_add_at_most_one_collective_to_the_statistics_one(
    fsdp: tuple[list[dict], str], fsdp_all: tuple[list[dict], str]
) -> None:
    for r in fsdp[0]:
        runs = r["runs"]
        for name in ("guard", "wesar", "wesar_init"):
            assert runs[name]["collectives"] == [1] * STEPS, name  # the transforms' one packed all-reduce
        # ε alone: only on the steps that read Adam's state (every 3 steps; the first two: first gradient, first state)
        assert runs["eps"]["collectives"] == [int(s < 2 or s % 3 == 0) for s in range(STEPS)]
        assert runs["none"]["collectives"] == [0] * STEPS
    for r in fsdp_all[0]:
        runs = r["runs"]
        # the clamp bounds every matrix tightly here, so it also reduces ‖ΔW‖ after every step; with statistics
        # on (every 2 steps) it takes ‖ΔW‖ from their all-reduce: still 2, where it would otherwise be 3
        assert runs["clamp"]["collectives"] == [2] * STEPS
        assert runs["all"]["collectives"] == runs["fused"]["collectives"] == [2] * STEPS


def test_fsdp2_dcp_checkpoint_restores_parameters_adam_and_transform_state(fsdp_all: tuple[list[dict], str]) -> None:
    ck = [r["runs"]["all"]["checkpoint"] for r in fsdp_all[0]]
    for c in ck:
        assert c["step"] == STEPS
        assert c["restored"] == c["saved"] != c["moved"]
    assert ck[0] == ck[1]


def test_tensor_parallel_transforms_equal_unsharded(tp: tuple[list[dict], str]) -> None:
    reports, _ = tp
    r0 = reports[0]["runs"]["all"]
    assert "(Shard(dim=1),)" in r0["placements"] and "(Replicate(),)" in r0["placements"] and r0["plain"] > 0
    _check_equal(reports, LAYOUT_CONFIGS["tp"])
    assert reports[0]["runs"]["fused"]["fused"] == {"sharded": True, "single": True}


def test_2d_mesh_fsdp_x_tp_transforms_equal_unsharded(mesh2d: tuple[list[dict], str]) -> None:
    reports, _ = mesh2d
    assert any(len(p.split("),")) > 1 for p in reports[0]["runs"]["all"]["placements"])  # placements on 2 dims
    _check_equal(reports, LAYOUT_CONFIGS["2d"])
    for r in reports:  # sharded on both dimensions of a mesh of all ranks: one all-reduce each, on the world
        assert r["runs"]["all"]["collectives"] == [2] * STEPS


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("layout")
    a = parser.parse_args()
    _worker(a.rank, a.port, a.out_dir, a.layout)
