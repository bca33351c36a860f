"""The project runs from a built wheel, not only from its checkout (issue 18, item 7).

The wheel is built from a copy of the source tree (no ``.git``, no build outputs), installed with
``--no-deps`` into a fresh virtual environment whose only other path is the site-packages that
holds the dependencies (torch, pyzmq...; a ``.pth`` line, which does not activate this checkout's
editable install), and run from an empty directory without ``PYTHONPATH``: every module then
comes from the wheel.  ``sentinel-agent grafana push`` must find the dashboards the wheel carries,
and ``sentinel demo`` must start the wheel's agent and write its report.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "runs", "artifacts")  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = [p for p in site.getsitepackages() if (Path(p) / "zmq").is_dir()]
    assert deps, "no site-packages with the dependencies"
    (Path(purelib) / "llm_sentinel_deps.pth").write_text("\n".join(deps) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def _run(venv: Path, *cmd: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_every_package_and_the_grafana_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("sentinel/attach.py", "sentinel/examples/tiny_gpt.py", "agent/daemon.py", "agent/report/page.py"):
        assert module in names
    assert {"sentinel_contract/protocol.py", "sentinel_contract/actions.py", "sentinel_contract/channels.py"} <= names
    shipped = {n.removeprefix("agent/grafana/") for n in names if n.startswith("agent/grafana/")}
    in_checkout = {str(p.relative_to(ROOT / "grafana")) for p in (ROOT / "grafana").rglob("*") if p.suffix in (".json", ".yml")}  # fmt: skip
    assert in_checkout and in_checkout <= shipped


def test_modules_come_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    code = (
        "import agent.grafana_push as g, sentinel_contract, agent.protocol, sentinel.examples.tiny_gpt as t\n"
        "print(g.__file__); print(sentinel_contract.__file__); print(t.__file__)\n"
        "print(agent.protocol is sentinel_contract.protocol)"
    )
    done = _run(venv, str(venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    *files, same = done.stdout.split()
    assert all(Path(f).resolve().is_relative_to(venv.resolve()) for f in files), files
    assert same == "True"


def test_grafana_push_finds_the_dashboards_the_wheel_carries(venv: Path, tmp_path: Path) -> None:
    helped = _run(venv, "sentinel-agent", "grafana", "push", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--url" in helped.stdout, helped.stderr
    code = (
        "from agent import grafana_push as g\n"
        "assert not (g.CHECKOUT_DIR / 'dashboards').is_dir(), g.CHECKOUT_DIR\n"
        "b = g.load_bundle(g.INSTALLED_DIR)\nprint(len(b.dashboards), len(b.rules))"
    )
    done = _run(venv, str(venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from agent import grafana_push  # this checkout's

    checkout = grafana_push.load_bundle(grafana_push.CHECKOUT_DIR)
    assert done.stdout.split() == [str(len(checkout.dashboards)), str(len(checkout.rules))]
    # without --dir: the files are found, so the push gets as far as the (unreachable) server: exit 1, not 2
    pushed = _run(
        venv, "sentinel-agent", "grafana", "push", "--url", "http://127.0.0.1:9", "--token", "t", cwd=tmp_path
    )
    assert pushed.returncode == 1, pushed.stderr
    assert "no --dir given" not in pushed.stderr


def test_sentinel_demo_runs_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    done = _run(venv, "sentinel", "demo", "--steps", "20", cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "agent up: metrics at http://127.0.0.1:" in done.stdout
    assert re.search(r"^  steps trained +20$", done.stdout, re.M), done.stdout[-2000:]
    report = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("run report: "))
    assert Path(report).is_file() and "<figure" in Path(report).read_text()
