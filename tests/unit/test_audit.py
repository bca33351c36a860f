"""``sentinel audit MODULE:FACTORY``: the role table, exit codes, JSON, meta-device models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from sentinel.examples.tiny_gpt import GPT, GPTConfig

from sentinel.audit import SECTIONS, AuditContext, Section, audit_model, load_factory
from sentinel.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny_gpt.py")


def write_factory(tmp_path: Path, body: str, name: str = "factories.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_audit_tiny_gpt_prints_the_table_and_exits_0(capsys):
    rc = main(["audit", f"{TINY}:model"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "preset: gpt2 (auto; matrices assigned per preset: gpt2 19," in out
    assert "architecture: N=4 layers, d=128, d_ffn=512, heads 4 (key/value 4)" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("parameter"))
    assert header.split() == ["parameter", "role", "layer", "shape", "fused", "parts"]
    row = next(line for line in lines if line.startswith("h.3.mlp.c_proj.weight"))
    assert row.split() == ["h.3.mlp.c_proj.weight", "down", "3", "128x512", "-"]
    row = next(line for line in lines if line.startswith("h.0.attn.c_attn.weight"))
    assert row.split()[:7] == ["h.0.attn.c_attn.weight", "qkv", "0", "384x128", "q", "128", "|"]
    assert "unassigned matrices: none" in out
    assert "model: GPT on meta" in out  # built on the meta device by default
    assert out.rstrip().endswith("result: ok; roles ok; takase skipped; wesar skipped; eps skipped")
    assert "ln_f.weight" not in out  # vectors only with --all


def test_audit_all_lists_vectors_and_module_path_target(capsys):
    rc = main(["audit", "sentinel.examples.tiny_gpt:model", "--all"])
    out = capsys.readouterr().out
    assert rc == 0
    assert next(line for line in out.splitlines() if line.startswith("ln_f.weight")).split() == [
        "ln_f.weight",
        "norm",
        "-",
        "128",
        "-",
    ]


def test_audit_unassigned_matrix_exits_3_and_lists_it(tmp_path: Path, capsys):
    path = write_factory(
        tmp_path,
        """
        import torch
        from sentinel.examples.tiny_gpt import GPT, GPTConfig

        def build():
            model = GPT(GPTConfig(n_layer=2))
            model.h[0].router = torch.nn.Linear(128, 4, bias=False)
            return model
        """,
    )
    rc = main(["audit", f"{path}:build"])
    out = capsys.readouterr().out
    assert rc == 3
    assert "== roles: fail - 1 of 12 weight matrices have no role" in out
    assert "unassigned matrices (1):\n  h.0.router.weight  4x128" in out
    assert next(line for line in out.splitlines() if line.startswith("h.0.router.weight")).split()[1] == "UNASSIGNED"
    # an override in the config fixes it
    cfg = tmp_path / "sentinel.yaml"
    cfg.write_text("roles:\n  overrides:\n    'h\\.\\d+\\.router\\.weight': gate\n")
    assert main(["audit", f"{path}:build", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert r"overrides: h\.\d+\.router\.weight -> gate" in out


def test_audit_json(capsys):
    assert main(["audit", f"{TINY}:model", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok" and report["exit_code"] == 0 and report["device"] == "meta"
    roles, *numeric = report["sections"]
    assert roles["name"] == "roles" and roles["status"] == "ok"
    assert [(s["name"], s["status"]) for s in numeric] == [
        ("takase", "skipped"),
        ("wesar", "skipped"),
        ("eps", "skipped"),
    ]
    data = roles["data"]
    assert data["preset"] == "gpt2" and data["n_layers"] == 4 and data["d_model"] == 128
    assert data["parameters"]["h.2.attn.c_proj.weight"]["role"] == "o"
    assert data["parameters"]["h.2.attn.c_attn.weight"]["fused_parts"]["sizes"] == [128, 128, 128]
    assert data["unassigned"] == []


def test_audit_usage_and_config_errors_exit_2(tmp_path: Path, capsys):
    assert main(["audit", "no_colon_here"]) == 2
    assert "is not MODULE:FACTORY" in capsys.readouterr().err
    assert main(["audit", f"{tmp_path}/missing.py:model"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["audit", f"{TINY}:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert main(["audit", f"{TINY}:GPTConfig"]) == 2
    assert "returned GPTConfig, not a torch.nn.Module" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("roles:\n  overrides:\n    'lm_head\\.weight': unembedding\n")
    assert main(["audit", f"{TINY}:model", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "roles.overrides['lm_head\\\\.weight']: unknown role 'unembedding'; allowed roles: embedding" in err
    with pytest.raises(SystemExit) as info:
        main(["audit", f"{TINY}:model", "--preset", "bert"])
    assert info.value.code == 2


def test_audit_ambiguous_auto_exits_2_and_preset_settles_it(tmp_path: Path, capsys):
    path = write_factory(
        tmp_path,
        """
        import torch.nn as nn

        def build():
            model = nn.Module()
            model.attn = nn.Module()
            model.attn.c_attn = nn.Linear(8, 24)
            model.self_attn = nn.Module()
            model.self_attn.q_proj = nn.Linear(8, 8)
            return model
        """,
    )
    assert main(["audit", f"{path}:build"]) == 2
    assert "presets llama, gpt2 each assign 1 matrices" in capsys.readouterr().err
    assert main(["audit", f"{path}:build", "--preset", "gpt2"]) == 3
    assert "preset: gpt2 (chosen)" in capsys.readouterr().out


def test_audit_factory_error_exits_1_and_no_meta(tmp_path: Path, capsys):
    path = write_factory(
        tmp_path,
        """
        import torch
        from sentinel.examples.tiny_gpt import GPT, GPTConfig

        def needs_data():
            model = GPT(GPTConfig(n_layer=1))
            model.wte.weight.data.copy_(torch.randn(256, 128).sort(dim=0).values)  # real storage needed
            model.h[0].attn.c_attn.weight.tolist()
            return model
        """,
    )
    assert main(["audit", f"{path}:needs_data"]) == 1
    assert "--no-meta" in capsys.readouterr().err
    assert main(["audit", f"{path}:needs_data", "--no-meta"]) == 0
    assert "model: GPT on cpu" in capsys.readouterr().out


def test_meta_device_1_7b_gpt_audits_in_seconds(tmp_path: Path, capsys):
    path = write_factory(
        tmp_path,
        """
        from sentinel.examples.tiny_gpt import GPT, GPTConfig

        def gpt_1_7b():
            return GPT(GPTConfig(vocab_size=50304, block_size=2048, n_layer=24, n_head=18, n_embd=2304))
        """,
    )
    start = time.perf_counter()
    rc = main(["audit", f"{path}:gpt_1_7b", "--json"])
    elapsed = time.perf_counter() - start
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["device"] == "meta"
    assert 1.6e9 < report["elements"] < 1.8e9
    data = report["sections"][0]["data"]
    assert (data["n_layers"], data["d_model"], data["d_ffn"], data["n_heads"]) == (24, 2304, 4 * 2304, 18)
    assert data["parameters"]["h.23.mlp.c_proj.weight"] == {
        "role": "down",
        "layer": 23,
        "shape": [2304, 4 * 2304],
        "fused_parts": None,
        "aliases": [],
        "alias_roles": [],
        "source": r"preset gpt2: (?:^|\.)mlp\.c_proj\.weight$",
    }
    assert elapsed < 10.0, f"auditing a meta-device 1.7B model took {elapsed:.1f}s"


def test_sections_are_extensible():
    def extra(ctx: AuditContext) -> Section:
        assert ctx.roles is not None  # later sections see the role map
        return Section("stability", "fail", f"{len(ctx.roles.names('down'))} down matrices checked", ["detail"])

    SECTIONS.append(extra)
    try:
        report = audit_model(GPT(GPTConfig(n_layer=2)), target="x:y")
    finally:
        SECTIONS.remove(extra)
    assert [s.name for s in report.sections] == ["roles", "takase", "wesar", "eps", "stability"]
    assert report.status == "fail" and report.exit_code == 3
    text = report.render()
    assert "== stability: fail - 2 down matrices checked\ndetail" in text
    assert "result: fail; roles ok;" in text and text.rstrip().endswith("; stability fail")
    with pytest.raises(ValueError, match="status 'bad'"):
        Section("x", "bad", "")


def test_load_factory_accepts_dotted_attribute(tmp_path: Path):
    path = write_factory(
        tmp_path,
        """
        from sentinel.examples.tiny_gpt import GPT, GPTConfig

        class Zoo:
            @staticmethod
            def small():
                return GPT(GPTConfig(n_layer=1))
        """,
        name="zoo.py",
    )
    factory = load_factory(f"{path}:Zoo.small")
    with torch.device("meta"):
        assert isinstance(factory(), GPT)


def test_console_script_help_documents_exit_codes():
    out = subprocess.run(
        [sys.executable, "-m", "sentinel.cli", "audit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "MODULE:FACTORY" in out and "--preset" in out
    flat = " ".join(out.split())
    assert "exit codes: 0 every check passed" in flat and "3 a check failed" in flat and "2 usage" in flat


def test_docs_example_is_the_real_output(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["audit", "examples/tiny_gpt.py:model"]) == 0
    out = capsys.readouterr().out
    doc = (ROOT / "docs" / "roles.md").read_text()
    assert f"```\n$ sentinel audit examples/tiny_gpt.py:model\n{out}```" in doc, "docs/roles.md example is stale"
