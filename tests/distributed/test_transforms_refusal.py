"""Where no single reduction covers the sharded parameters, the transforms refuse at attach, loudly.

One gloo rank (this file run as a script): two Linear layers whose weights are DTensors on two
unrelated device meshes.  No all-reduce can form whole-tensor sums over both, so ``attach``
must turn the guard's detection, WeSaR, ε and the clamp off with one WARNING that names them,
gives the reason and the fix, and training must go on with the optimizer's plain update.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import logging

    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import sentinel

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    meshes = [DeviceMesh("cpu", [0], mesh_dim_names=(name,)) for name in ("a", "b")]
    for layer, mesh in zip((model[0], model[2]), meshes):
        for key in ("weight", "bias"):
            p = getattr(layer, key)
            setattr(layer, key, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optim = {
        "guard": {"enabled": True},
        "wesar": {"enabled": True, "d_model": 8, "d_ffn": 8, "n_layers": 1},
        "eps": {"enabled": True},
        "clamp": {"enabled": True, "default": 0.01},
    }
    sn = sentinel.attach(
        model,
        opt,
        publish={"enabled": False},
        control={"enabled": False},
        stats={"enabled": False},
        optim=optim,
    )
    before = [p.full_tensor().clone() for p in model.parameters()]
    for _ in range(2):
        sum(p.to_local().square().sum() for p in model.parameters()).backward()  # DTensor gradients
        opt.step()
        opt.zero_grad()
        sn.observe()
    report = {
        "transforms": sorted(sn.chain.transforms),
        "detect": sn.chain.transforms["guard"].detect,
        "moved": all(not torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters())),
    }
    sn.close()
    (Path(out_dir) / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_transforms_refuse_parameters_on_unrelated_meshes_with_one_warning(tmp_path: Path) -> None:
    from ranks import Ranks  # not at the top: the worker runs this file without tests/ on their path

    with Ranks(HERE, tmp_path, log_dir=tmp_path, n=1, cwd=ROOT) as ranks:
        codes = ranks.wait(120)
    text = ranks.log()
    assert codes == [0], text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == {"transforms": ["guard"], "detect": False, "moved": True}
    warnings = [line for line in text.splitlines() if "turned OFF" in line]
    assert len(warnings) == 1, text
    line = warnings[0]
    assert line.startswith("WARNING sentinel: optim.guard, optim.wesar, optim.eps, optim.clamp turned OFF")
    assert "different device meshes" in line and "fix:" in line


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir")
    a = parser.parse_args()
    _worker(a.rank, a.port, a.out_dir)
