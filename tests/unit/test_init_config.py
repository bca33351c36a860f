"""``sentinel init`` and ``sentinel-agent init``: a commented file with every key, that loads as the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.cli import main as agent_main
from agent.config import AgentConfig
from agent.config import load_config as load_agent_config
from agent.typedconfig import reference
from sentinel.cli import main as sentinel_main
from sentinel.config import Config, load_config


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and f"{prefix}{k}" not in _leaf_dicts:
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


_leaf_dicts = {
    key for cls in (Config, AgentConfig) for key, _, default, _ in reference(cls) if isinstance(default, dict)
}


@pytest.mark.parametrize("cls,main,name,load", [
    (Config, sentinel_main, "sentinel.yaml", load_config),
    (AgentConfig, agent_main, "agent.yaml", load_agent_config),
])  # fmt: skip
def test_init_writes_every_key_with_its_default_and_why(cls, main, name, load, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    text = (tmp_path / name).read_text()
    data = yaml.safe_load(text)
    assert load(tmp_path / name) == load(None)  # loading the file gives exactly the defaults
    rows = reference(cls)
    assert _keys(data) == {key for key, *_ in rows}  # every key, nothing else
    comments = _comments(text)
    for key, allowed, _, doc in rows:
        said = comments.get(key, "")
        assert f"Allowed: {allowed}." in said, f"{key}: {said!r}"
        assert doc.split()[:4] == said.split()[:4], f"{key}: the comment does not say why: {said!r}"


def _comments(text: str) -> dict[str, str]:
    """Dotted key -> the comment lines right above it, joined."""
    out, path, block = {}, [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        if stripped:
            depth = (len(line) - len(line.lstrip())) // 2
            name = stripped.split(":", 1)[0]
            path[depth:] = [name]
            out[".".join(path)] = " ".join(block)
        block = []
    return out


def test_init_refuses_to_replace_a_file_unless_forced(tmp_path: Path, capsys) -> None:
    target = tmp_path / "sentinel.yaml"
    target.write_text("run: mine\n")
    assert sentinel_main(["init", str(target)]) == 1
    assert "--force" in capsys.readouterr().err and target.read_text() == "run: mine\n"
    assert sentinel_main(["init", str(target), "--force"]) == 0 and "run: null" in target.read_text()
    assert agent_main(["init", str(tmp_path / "no" / "such" / "dir.yaml")]) == 1


def test_init_to_stdout(capsys) -> None:
    assert agent_main(["init", "-"]) == 0
    assert load_agent_config(yaml.safe_load(capsys.readouterr().out)) == load_agent_config(None)
