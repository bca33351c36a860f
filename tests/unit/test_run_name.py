"""The default run name: from the job, not the process, so relaunches and ranks agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sentinel
from sentinel.config import ConfigError
from sentinel.run_name import default_run_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "env,argv,name",
    [
        ({"SENTINEL_RUN": "exp-7", "SLURM_JOB_ID": "99"}, ["train.py"], "exp-7"),
        ({"TORCHELASTIC_RUN_ID": "job-3", "SLURM_JOB_ID": "99"}, ["train.py"], "job-3"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "99"}, ["train.py"], "slurm-99"),
        ({"SLURM_JOB_ID": "100", "SLURM_ARRAY_JOB_ID": "99", "SLURM_ARRAY_TASK_ID": "4"}, ["t.py"], "slurm-99_4"),
        ({}, ["/home/me/runs/train.py"], "train"),
        ({}, ["/usr/lib/python3/site-packages/mypkg/pretrain.py"], "pretrain"),  # python -m mypkg.pretrain
        ({}, ["my script!.py"], "my-script"),
        ({}, ["-c"], "run"),
        ({}, [""], "run"),
        ({}, [], "run"),
    ],
)
def test_the_rule(env: dict, argv: list, name: str) -> None:
    assert default_run_name(env, argv) == name


def test_two_launches_of_a_script_share_the_name(tmp_path: Path) -> None:
    script = tmp_path / "pretrain.py"
    script.write_text(
        "import torch, sentinel\n"
        "m = torch.nn.Linear(2, 2)\n"
        "sn = sentinel.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), publish={'enabled': False}, "
        "control={'enabled': False})\n"
        "print(sn.run)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SENTINEL_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")}
    env["PYTHONPATH"] = str(ROOT)
    names = [
        subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert names == ["pretrain\n", "pretrain\n"]  # was run-<host>-<pid>: a new series per launch


def test_attach_needs_no_config() -> None:
    model = torch.nn.Linear(2, 2)
    sn = sentinel.attach(model, torch.optim.AdamW(model.parameters()), publish={"enabled": False})
    assert sn.config.stats.enabled and sn.run
    sn.close()


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist \(leave the config out to run on the defaults\)"):
        sentinel.attach(model, torch.optim.AdamW(model.parameters()), config=tmp_path / "nope.yaml")
