"""benchmarks/gpu_check.sh and the GPU flags of benchmarks/overhead.py, as far as a machine
without CUDA can check them: the script says it did not run and exits 0 without running
anything, its dry run prints commands that overhead.py accepts, and the benchmark's variants
take a step on the CPU with the new device/dtype/shape options."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NO_RUN = "no CUDA device: gpu_check did not run"

sys.path.insert(0, str(ROOT / "benchmarks"))
import overhead  # noqa: E402


def _script(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    environ.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=120, cwd=tmp_path
    )


def test_without_cuda_it_says_it_did_not_run_and_runs_nothing(tmp_path: Path) -> None:
    result = _script(tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(NO_RUN) and "sees no CUDA device" in line
    assert not (tmp_path / "out").exists(), "no logs: neither the tests nor the benchmark ran"


def test_without_a_python_it_says_it_did_not_run(tmp_path: Path) -> None:
    result = _script(tmp_path=tmp_path, PYTHON=str(tmp_path / "no-such-python"))
    assert result.returncode == 0
    assert result.stdout.startswith(NO_RUN)


def test_an_unknown_argument_is_a_usage_error(tmp_path: Path) -> None:
    result = _script("--frobnicate", tmp_path=tmp_path)
    assert result.returncode == 64 and "unknown argument --frobnicate" in result.stderr


def _dry_run_commands(tmp_path: Path) -> dict[str, list[str]]:
    result = _script("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = {}
    for line in result.stdout.splitlines():
        argv = shlex.split(line.split("#")[0])
        if argv[:1] == ["timeout"]:
            assert int(argv[1]) > 0
            commands[argv[3] if argv[3] != "-m" else argv[4]] = argv[2:]
    return commands


def test_dry_run_prints_the_gpu_tests_and_a_benchmark_command_overhead_accepts(tmp_path: Path) -> None:
    commands = _dry_run_commands(tmp_path)
    assert set(commands) == {"pytest", "benchmarks/overhead.py"}
    assert commands["pytest"][-1] == "tests/gpu"
    bench = commands["benchmarks/overhead.py"]
    assert bench[0] == sys.executable
    args = overhead.parse_args(bench[2:])
    assert (args.device, args.dtype, args.gpt) == ("cuda", "bfloat16", "350m")
    assert args.syncs > 0, "the host synchronisations are counted"
    from sentinel.config import ProbesConfig, StatsConfig

    assert args.probes == ProbesConfig().every, "probes at their default cadence"
    assert StatsConfig().every == 1, "the sentinel variant relies on statistics every step by default"
    with torch.device("meta"):
        n_params = sum(p.numel() for p in overhead.GPT(overhead.gpt_config(args)).parameters())
    assert 300e6 < n_params < 400e6, f"~350M parameters, not {n_params / 1e6:.0f}M"
    timeouts = [
        int(line.split()[1])
        for line in _script("--dry-run", tmp_path=tmp_path).stdout.splitlines()
        if line.strip().startswith("timeout")
    ]
    assert sum(timeouts) < 540, "the whole check must end well inside a 10-minute command"


def test_the_variants_step_with_the_device_dtype_and_shape_options() -> None:
    torch.set_num_threads(1)
    args = overhead.parse_args(["--dtype", "bfloat16", "--n-layer", "1", "--n-embd", "32", "--block-size", "16"])
    gpt = overhead.gpt_config(args)
    assert (gpt.n_layer, gpt.n_embd, gpt.block_size, gpt.vocab_size) == (1, 32, 16, 256)
    tc = overhead.TrainConfig(steps=4, batch_size=2)
    for name in ("bare", "callback"):
        v = overhead.Variant(name, tc, "tcp://127.0.0.1:1", gpt=gpt, dtype=torch.bfloat16)
        before = [p.detach().clone() for p in v.model.parameters()]
        v.run(3, warmup=1)
        assert len(v.times) == 2
        assert all(p.dtype == torch.float32 for p in v.model.parameters()), "autocast keeps float32 weights"
        assert any(not torch.equal(b, p) for b, p in zip(before, v.model.parameters())), "it trained"
    assert overhead.count_syncs([v], 2) == {}, "no counting off CUDA"


@pytest.mark.parametrize("preset", ["tiny", "350m"])
def test_the_shape_presets(preset: str) -> None:
    gpt = overhead.gpt_config(overhead.parse_args(["--gpt", preset]))
    if preset == "tiny":
        assert gpt == overhead.GPTConfig()
    else:
        assert (gpt.n_layer, gpt.n_embd, gpt.n_head) == (24, 1024, 16)


def _fake_cuda_python(tmp_path: Path, *, hide: tuple[str, ...] = (), torch_shim: Path | None = None) -> Path:
    """A `python` whose torch claims a CUDA device (and which cannot import ``hide``), so that the
    script's paths past its CUDA check run here; the GPU work itself then fails, as it must.
    With ``torch_shim`` (a folder holding a stand-in ``torch``) that stand-in is imported instead."""
    site = tmp_path / "fake-site"
    site.mkdir()
    patch = "" if torch_shim else "import torch\ntorch.cuda.is_available = lambda: True\n"
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {hide!r}:\n    sys.modules[name] = None\n{patch}")
    path = f"{site}:{torch_shim}" if torch_shim else str(site)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{path}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_a_missing_package_is_named_and_exits_2(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "torch"  # a torch that only says it has CUDA: the check goes no further
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "__version__ = 'shim'\nclass cuda:\n    is_available = staticmethod(lambda: True)\n"
    )
    python = _fake_cuda_python(tmp_path, hide=("zmq",), torch_shim=shim.parent)
    result = _script(tmp_path=tmp_path, PYTHON=str(python))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing Python packages: pyzmq" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_timeouts_of_the_two_parts_are_logged_and_exit_1(tmp_path: Path) -> None:
    """Past the checks, both parts run under their timeouts (here too short for either to end),
    their logs land in $OUT, and the summary gives each exit status."""
    result = _script(
        tmp_path=tmp_path,
        PYTHON=str(_fake_cuda_python(tmp_path)),
        GPU_CHECK_TESTS_TIMEOUT="2",
        GPU_CHECK_BENCH_TIMEOUT="2",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"summary.txt", "gpu_tests.log", "overhead.log"}
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_check ")
    assert "tests/gpu: rc=124" in summary and "overhead: rc=124" in summary
    assert "tests/gpu timed out after 2s" in result.stdout
    assert "the benchmark timed out after 2s" in result.stdout
