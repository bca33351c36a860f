"""``sentinel audit`` on models with other calling conventions, and on every model of the role matrix:
exit 0 or a documented code with a message, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from model_zoo import ZOO

from sentinel.audit import EXIT_FAILED, EXIT_MODEL, EXIT_OK, EXIT_USAGE
from sentinel.cli import main

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers binds its log handler to the stderr of the first test that logs; later tests'
    captured stderr would then show logging's own "--- Logging error ---" traceback."""
    import transformers

    transformers.logging.set_verbosity_error()


def factory(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "zoo_factory.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport torch\nfrom model_zoo import *\n{body}\n")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("name", list(ZOO))
def test_every_model_of_the_matrix_audits_with_a_documented_code(tmp_path: Path, capsys, name: str):
    path = factory(tmp_path, f"def build():\n    return ZOO[{name!r}][0]()")
    code, out, err = run(capsys, f"{path}:build", "--no-meta")
    assert code in (EXIT_OK, EXIT_FAILED), err
    assert "== roles: ok" in out or "== roles: warn" in out, out
    assert "== eps: ok" in out or "== eps: warn" in out  # the forward/backward ran


def test_nanogpt_last_position_logits_use_the_models_own_loss(tmp_path: Path, capsys):
    """nanoGPT returns logits[:, [-1], :] without targets: the audit passes targets and takes the loss."""
    path = factory(tmp_path, "def build():\n    return ZOO['nanogpt_c_attn'][0]()")
    code, out, _ = run(capsys, f"{path}:build", "--no-meta", "--input-shape", "2,8")
    assert code in (EXIT_OK, EXIT_FAILED) and "== eps: ok" in out and "== takase:" in out


def test_unguessable_convention_exits_4_with_the_fix_and_loss_hook_settles_it(tmp_path: Path, capsys):
    body = '''
class Wrapped(torch.nn.Module):
    """Takes a dict batch and returns only the last position's logits."""
    def __init__(self):
        super().__init__()
        self.inner = ZOO["plain_qkv_proj_fc"][0]()
    def forward(self, batch):
        return self.inner(batch["ids"])[0][:, -1]

def build():
    return Wrapped()

def loss(model, ids):
    logits = model.inner(ids)[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
'''
    path = factory(tmp_path, body)
    code, out, err = run(capsys, f"{path}:build", "--no-meta")
    assert code == EXIT_MODEL and "could not run the model" in err and "--loss MODULE:FUNCTION" in err
    code, out, err = run(capsys, f"{path}:build", "--no-meta", "--loss", f"{path}:loss")
    assert code in (EXIT_OK, EXIT_FAILED) and "== eps: ok" in out, err


def test_bad_loss_and_input_shape_are_usage_errors(tmp_path: Path, capsys):
    path = factory(tmp_path, "def build():\n    return ZOO['plain_qkv_proj_fc'][0]()")
    code, _, err = run(capsys, f"{path}:build", "--no-meta", "--loss", f"{path}:nothing")
    assert code == EXIT_USAGE and "no attribute 'nothing'" in err
    with pytest.raises(SystemExit) as exc:
        main(["audit", f"{path}:build", "--input-shape", "two"])
    assert exc.value.code == EXIT_USAGE and "is not B,T" in capsys.readouterr().err


def test_a_block_without_attention_fails_the_audit_when_probes_are_on(tmp_path: Path, capsys):
    body = """
class ExpMix(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(64, 16)
        self.h = torch.nn.ModuleList(torch.nn.ModuleDict(dict(qkv=torch.nn.Linear(16, 48), proj=torch.nn.Linear(16, 16)))
                                     for _ in range(2))
        self.head = torch.nn.Linear(16, 64)
    def forward(self, ids):
        x = self.tok(ids)
        for b in self.h:
            q, k, v = b["qkv"](x).split(16, dim=-1)
            w = torch.exp(q @ k.transpose(-1, -2) / 4)
            x = x + b["proj"]((w / w.sum(-1, keepdim=True)) @ v)
        return self.head(x)

def build():
    return ExpMix()
"""
    path = factory(tmp_path, body)
    config = tmp_path / "sentinel.yaml"
    config.write_text(
        "probes:\n  enabled: true\nroles:\n  overrides:\n"
        + "".join(f"    '{k}': {v}\n" for k, v in [(r"h\.\d+\.qkv\.weight", "qkv"), (r"h\.\d+\.proj\.weight", "o")])
    )
    code, out, _ = run(capsys, f"{path}:build", "--no-meta", "--config", str(config), "--skip", "takase")
    assert code == EXIT_FAILED, out
    assert "== roles: fail - 2 blocks without a found attention" in out and "no attn_logit_max" in out
    code, out, _ = run(capsys, f"{path}:build", "--no-meta", "--skip", "takase")
    assert "unassigned matrices (2)" in out and "ready to paste" in out and r"'h\.\d+\.proj\.weight': o" in out


def test_meta_models_audit_their_roles_without_weights(tmp_path: Path, capsys):
    path = factory(tmp_path, "def build():\n    return ZOO['obfuscated_abc'][0]()")
    code, out, _ = run(capsys, f"{path}:build")
    assert code == EXIT_OK and "structure: one traced forward on 1x8 tokens: 2 attention calls (softmax)" in out
    assert sys.modules  # the factory file imported cleanly
