"""Every code block of the README runs as written (or is checked as far as a test can).

Each fenced block carries, on the line before it, an HTML comment (invisible on GitHub) that
says how this test treats it:

- ``<!-- readme-test: run -->``: a Python block run as it stands, in a fresh interpreter, in
  an empty temporary directory (no ``sentinel.yaml``, no agent);
- ``<!-- readme-test: run with model, optimizer[, scheduler] -->``: a Python block that
  continues the attach example; it runs after a preamble that defines those names (a tiny
  model of this test's own, AdamW, a LambdaLR scheduler);
- ``<!-- readme-test: imports (why) -->``: a Python block that needs objects a test cannot
  build cheaply; its import lines run and the whole block must compile;
- ``<!-- readme-test: help -->``: a shell block of long-running commands (an agent, the demo,
  a benchmark); each command's ``--help`` must exit 0 and list every ``--option`` the line uses;
- ``<!-- readme-test: illustrative (why) -->``: not run, and the reason is required.

A block without a marker fails the test, so a new block cannot slip in unchecked.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
PREAMBLE = """\
import torch
import sentinel

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
"""
EPILOGUE = """
for _ in range(3):
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    sn.observe(loss=1.0)
sn.close()
"""


def blocks() -> list[tuple[int, str, str, str]]:
    text = (ROOT / "README.md").read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("lang")) + 1
        out.append((line, m["mark"] or "", m["lang"], m["body"]))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SENTINEL_RUN", None)
    return env


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )


def _commands(body: str) -> list[list[str]]:
    lines = [line.split("  #")[0].split(" # ")[0].strip() for line in body.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def _help_argv(argv: list[str]) -> list[str]:
    """The command with its positional arguments (subcommands) kept and ``--help`` after them."""
    head = [argv[0]] if argv[0] != "python" else [sys.executable, argv[1]]
    rest = argv[len(head) :] if argv[0] != "python" else argv[2:]
    for word in rest:
        if word.startswith("-") or "/" in word or ":" in word:
            break
        head.append(word)
    if head[0] in ("sentinel", "sentinel-agent"):
        head = [sys.executable, "-m", "sentinel.cli" if head[0] == "sentinel" else "agent", *head[1:]]
    return [*head, "--help"]


def test_every_block_is_marked() -> None:
    found = blocks()
    assert len(found) >= 8
    for line, mark, lang, _ in found:
        assert mark, f"README.md:{line}: a ```{lang} block without a <!-- readme-test: ... --> marker"
        kind = mark.split()[0]
        assert kind in ("run", "imports", "help", "illustrative"), f"README.md:{line}: unknown marker {mark!r}"
        if kind in ("illustrative", "imports"):
            assert "(" in mark, f"README.md:{line}: say why the block is not run: {mark!r}"


@pytest.mark.parametrize("line,mark,lang,body", [b for b in blocks() if b[1].startswith("run")], ids=lambda v: str(v))
def test_python_block_runs(line: int, mark: str, lang: str, body: str, tmp_path: Path) -> None:
    assert lang == "python", f"README.md:{line}: only Python blocks are run"
    needs = {n.strip() for n in mark.removeprefix("run").removeprefix(" with").split(",") if n.strip()}
    code = body if not needs else PREAMBLE + body + EPILOGUE
    done = _python(code, tmp_path)
    assert done.returncode == 0, f"README.md:{line} fails as written:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("line,mark,lang,body", [b for b in blocks() if b[1].startswith("imports")], ids=str)
def test_python_block_imports(line: int, mark: str, lang: str, body: str, tmp_path: Path) -> None:
    compile(body, f"README.md:{line}", "exec")
    imports = "\n".join(s for s in body.splitlines() if s.startswith(("import ", "from ")))
    done = _python(imports, tmp_path)
    assert done.returncode == 0, f"README.md:{line}: the imports fail:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("line,mark,lang,body", [b for b in blocks() if b[1] == "help"], ids=str)
def test_shell_block_commands_exist(line: int, mark: str, lang: str, body: str) -> None:
    assert lang == "bash"
    for argv in _commands(body):
        cmd = _help_argv(argv)
        done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README.md:{line}: {shlex.join(argv)}: --help exits {done.returncode}"
        for option in (w.split("=")[0] for w in argv if w.startswith("--")):
            assert option in done.stdout, f"README.md:{line}: {shlex.join(argv)}: {option} is not in its --help"
