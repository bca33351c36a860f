"""A bad configuration file fails at start, through the real command lines, naming what is wrong.

Each message carries the key's dotted name, the value and what is allowed; the exit code is 2
and there is no traceback.  The agent is run as ``sentinel-agent run --config FILE``; the
trainer configuration goes through ``sentinel audit --config FILE`` (the trainer's command
line that reads it) and through ``sentinel.attach(config=FILE)``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sentinel
from agent.typedconfig import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def command(name: str, module: str) -> list[str]:
    """The installed console script, else the module (same entry point)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return [path] if path else [sys.executable, "-m", module]


# the cases leave these keys alone; should one start an agent anyway, it takes no fixed port
FREE_PORTS = [
    "--stats-endpoint",
    "tcp://127.0.0.1:*",
    "--commands-endpoint",
    "tcp://127.0.0.1:*",
    "--metrics-port",
    "0",
]

AGENT_CASES = [
    ("histroy:\n  steps: 64\n", "histroy: unknown key; allowed keys here:"),
    ("history:\n  stepz: 64\n", "history.stepz: unknown key; allowed keys here: max_layouts, max_matrix_bytes, steps"),
    ("history:\n  steps: lots\n", "history.steps: 'lots' has type str; allowed: int in [16, 1000000]"),
    ("history:\n  steps: 3\n", "history.steps: 3 is out of range; allowed: int in [16, 1000000]"),
    ("export:\n  max_stats: true\n", "export.max_stats: True has type bool; allowed: int in [1, 1024]"),
    (
        "commands:\n  resend_seconds: .nan\n",
        "commands.resend_seconds: nan is not allowed; allowed: float in [0.01, 3600.0]",
    ),
    ("log_level: loud\n", "log_level: 'loud' is not allowed; allowed: one of 'debug', 'info', 'warning', 'error'"),
    ("limits: 5\n", "limits: 5 is not a mapping"),
    ("- just\n- a list\n", "top level must be a mapping, got list"),
]


@pytest.mark.parametrize("text, message", AGENT_CASES, ids=[m.split(":")[0] or "top" for _, m in AGENT_CASES])
def test_agent_run_with_a_bad_config_exits_2_naming_key_value_and_range(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cmd = command("sentinel-agent", "agent") + ["run", "--config", str(path), *FREE_PORTS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sentinel-agent: configuration error: ") and message in line, line
    assert not (tmp_path / "sentinel-agent-state").exists()  # nothing created before the config is valid


TRAINER_CASES = [
    ("stats:\n  every: 0\n", "stats.every: 0 is out of range; allowed: int in [1, inf]"),
    ("optim:\n  guard:\n    alpha: high\n", "optim.guard.alpha: 'high' has type str; allowed: float in [0.5, 0.9999]"),
    ("publish:\n  queue: 10\n  qeue: 5\n", "publish.qeue: unknown key; allowed keys here:"),
]


@pytest.mark.parametrize("text, message", TRAINER_CASES[:2], ids=["range", "type"])
def test_trainer_config_errors_exit_2_from_the_command_line(tmp_path, text, message):
    path = tmp_path / "sentinel.yaml"
    path.write_text(text)
    cmd = command("sentinel", "sentinel.cli") + ["audit", "examples/tiny_gpt.py:model", "--config", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, message", TRAINER_CASES, ids=["range", "type", "unknown"])
def test_attach_refuses_a_bad_config_file_before_touching_the_model(tmp_path, text, message):
    path = tmp_path / "sentinel.yaml"
    path.write_text(text)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError) as info:
        sentinel.attach(model, optimizer, config=path)
    assert message in str(info.value)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
