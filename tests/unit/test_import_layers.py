"""One direction of imports: the trainer and the agent stand on the contract, and neither on the other.

The layering (docs/architecture.md): ``sentinel_contract`` imports neither ``sentinel`` nor ``agent``
nor torch; ``sentinel`` (and ``examples``, shipped as ``sentinel.examples``) imports nothing of
``agent``; ``agent`` imports nothing of ``sentinel`` and never loads torch.  The static walk reads
every import statement of every module, at top level or inside a function, under ``TYPE_CHECKING``
or not, and string arguments of ``importlib.import_module``/``__import__``; the dynamic checks import
every agent module, and run the real ``sentinel-agent run`` to ready, in fresh interpreters.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sentinel_contract.agent_process import AgentProcess

ROOT = Path(__file__).resolve().parents[2]
#: source directory -> the package name it is installed as
PACKAGES = {"sentinel": "sentinel", "examples": "sentinel.examples", "agent": "agent", "sentinel_contract": "sentinel_contract"}  # fmt: skip


def _module_name(path: Path, directory: str) -> str:
    parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[directory], *parts])


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _names(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        name = _absolute(node, package)
        return [name] + [f"{name}.{alias.name}" for alias in node.names]  # from agent import protocol
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def _package(path: Path, module: str) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package(path, module)
    return [(node.lineno, name) for node in ast.walk(tree) for name in _names(node, package)]


def load_time_imports(path: Path, module: str) -> set[str]:
    """What importing ``path`` imports at once: module-level statements, not function bodies nor
    ``if TYPE_CHECKING:`` blocks (an import cycle among these is one a fresh interpreter walks into)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package(path, module)
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            found.update(_names(node, package))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []))

    visit(tree.body)
    return found


def _modules(directory: str) -> list[tuple[Path, str]]:
    return [(p, _module_name(p, directory)) for p in sorted((ROOT / directory).rglob("*.py"))]


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(directories: tuple[str, ...], forbidden: set[str]) -> list[str]:
    out = []
    for directory in directories:
        for path, module in _modules(directory):
            for line, name in imports_of(path, module):
                if _top(name) in forbidden:
                    out.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name}")
    return out


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: a lazy, a relative, a from-package and a dynamic import are all found."""
    pkg = tmp_path / "sentinel"
    pkg.mkdir()
    source = textwrap.dedent(
        """
        import importlib
        from typing import TYPE_CHECKING
        from . import curve
        if TYPE_CHECKING:
            from agent.config import AgentConfig
        def later():
            from agent import report
            import agent.spawn as spawn
            return importlib.import_module("agent.policy")
        """
    )
    (pkg / "mod.py").write_text(source)
    names = [n for _, n in imports_of(pkg / "mod.py", "sentinel.mod")]
    assert "sentinel.curve" in names
    assert {"agent.config", "agent.report", "agent.spawn", "agent.policy"} <= set(names)
    assert _top("agentx.y") != "agent" and _top("sentinel_contract.protocol") != "sentinel"


def test_every_package_directory_is_walked() -> None:
    for directory in PACKAGES:
        assert len(_modules(directory)) >= 3, directory
    assert any(m == "sentinel.curve" for _, m in _modules("sentinel"))
    assert any(m == "agent.predict.base" for _, m in _modules("agent"))


def test_the_trainer_imports_nothing_of_the_agent() -> None:
    assert _violations(("sentinel", "examples"), {"agent"}) == []


def test_the_agent_imports_nothing_of_the_trainer() -> None:
    assert _violations(("agent",), {"sentinel", "torch"}) == []


def test_the_contract_imports_neither_side_nor_torch() -> None:
    assert _violations(("sentinel_contract",), {"sentinel", "agent", "torch"}) == []


def test_the_contract_has_no_import_cycle() -> None:
    modules = dict((m, p) for p, m in _modules("sentinel_contract"))
    graph = {m: {n for _, n in imports_of(p, m) if n in modules} - {m, "sentinel_contract"} for m, p in modules.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        assert seen.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        seen[m] = 2

    for m in sorted(graph):
        visit(m, [])


#: load-time import cycles that predate this test (issue 18, item 2: the trainer modules that take the whole
#: ``Sentinel`` handle); a cycle may shrink or go, a new one fails
KNOWN_CYCLES = (
    {
        "sentinel",
        "sentinel.attach",
        "sentinel.checkpoint",
        "sentinel.control",
        "sentinel.gradnorms",
        "sentinel.publish",
    },
    {"agent.report", "agent.report.forecasts", "agent.report.page"},
)


def import_cycles(paths: dict[str, Path] | None = None) -> list[set[str]]:
    """The strongly connected components (more than one module) of the load-time import graph."""
    paths = paths or {m: p for d in PACKAGES for p, m in _modules(d)}
    graph = {m: sorted(n for n in load_time_imports(p, m) if n in paths and n != m) for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_no_new_import_cycle() -> None:
    new = [sorted(c) for c in import_cycles() if not any(c <= known for known in KNOWN_CYCLES)]
    assert new == [], f"new load-time import cycles: {new}"


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import c\n")
    (tmp_path / "b.py").write_text("def f():\n    import c\nfrom a import x\n")
    assert load_time_imports(tmp_path / "a.py", "a") == {"b", "typing", "typing.TYPE_CHECKING"}
    assert load_time_imports(tmp_path / "b.py", "b") == {"a", "a.x"}
    (tmp_path / "c.py").write_text("import a\n")
    paths = {m: tmp_path / f"{m}.py" for m in "abc"}
    assert import_cycles(paths) == [{"a", "b"}]  # a and b reach c only lazily or for the type checker


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_no_agent_module_loads_torch() -> None:
    """Every module of the agent and of the contract imported in one fresh interpreter: torch stays out."""
    modules = [m for d in ("agent", "sentinel_contract") for _, m in _modules(d) if not m.endswith("__main__")]
    done = _fresh(
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'sentinel.')) or m == 'sentinel'))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert len(modules) > 40


def test_the_trainer_does_not_load_the_agent() -> None:
    """Importing sentinel (attach, control, publish, the demo, the CLI) brings no agent module along."""
    done = _fresh(
        "import sys\nimport sentinel, sentinel.cli, sentinel.demo, sentinel.control, sentinel.publish, sentinel.curve\n"
        "print(sorted(m for m in sys.modules if m == 'agent' or m.startswith('agent.')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _ImportTimeAgent(AgentProcess):
    """``sentinel-agent run`` under ``python -X importtime``: its log lists every module it imported."""

    def command(self) -> list[str]:
        cmd = super().command()
        return [cmd[0], "-X", "importtime", *cmd[1:]]


@pytest.mark.slow
def test_a_running_agent_never_imports_torch(tmp_path: Path) -> None:
    agent = _ImportTimeAgent(tmp_path / "agent")
    with agent:
        assert agent.alive
        assert agent.metrics_text().startswith("#")  # serving: the whole daemon is up
    log = agent.log()
    imported = {line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if line.startswith("import time:")}
    assert "agent.daemon" in imported and "sentinel_contract.protocol" in imported  # the log is the real thing
    assert not any(m == "torch" or m.startswith("torch.") for m in imported), sorted(imported)[:20]
    assert not any(m == "sentinel" or m.startswith("sentinel.") for m in imported)
