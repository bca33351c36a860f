"""``sentinel audit`` on Takase et al.'s 1.7B configuration (papers/000 Table 4): Fig. 2's reading,
measured on the real model with a few random tokens.

Vanilla (small init with W_o, W_down / √(2N), embeddings at the same small std) breaks the
"large shortcut" condition and its per-layer FFN bound (eq. 15) is largest in the shallow layers;
Scaled Embed and Embed LN keep both conditions and a small bound.  The three methods differ only
in the forward pass, so one 1.76B-parameter model (7 GB in float32) serves all three.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from sentinel.examples.tiny_gpt import takase_1p7b

from sentinel.audit import audit_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports() -> dict:
    import torch

    torch.manual_seed(0)
    model = takase_1p7b("vanilla")
    out = {}
    for method in ("vanilla", "scaled_embed", "embed_ln"):
        model.cfg.scaled_embed, model.cfg.embed_ln = method == "scaled_embed", method == "embed_ln"
        out[method] = audit_model(model, target=method, tokens=8, skip=("wesar", "eps"))
    del model
    gc.collect()
    return out


def _takase(report):
    return next(s for s in report.sections if s.name == "takase")


def test_vanilla_fails_with_the_bound_largest_in_shallow_layers(reports) -> None:
    report = reports["vanilla"]
    section = _takase(report)
    assert report.exit_code == 3 and section.status == "fail"
    data = section.data
    assert data["large_sublayers"] == []  # condition 1 holds: W_o, W_down are scaled
    assert data["embedding_std"] < 0.05  # condition 2 fails: σ ≈ √(2/(5·2304)) ≈ 0.013
    bounds = data["ffn_bound"]
    assert len(bounds) == 24 and data["ffn_bound_max_layer"] <= 2
    assert bounds[0] > 5 * bounds[-1] and bounds[0] > 10
    assert "fix: Scaled Embed (stabilise.scaled_embed: true) or Embed LN" in "\n".join(section.lines)


@pytest.mark.parametrize("method", ["scaled_embed", "embed_ln"])
def test_scaled_embed_and_embed_ln_pass_with_a_small_bound(reports, method: str) -> None:
    report, vanilla = reports[method], _takase(reports["vanilla"]).data
    section = _takase(report)
    assert section.status == "ok" and report.exit_code == 0, section.lines
    assert section.data["embedding_std"] > 0.5
    assert max(section.data["ffn_bound"]) < 3 < vanilla["ffn_bound"][0]


def test_cli_prints_the_table_and_names_the_fix() -> None:
    """The same check through the command line, on a 24-layer model of width 256 (same reading, fast)."""
    code = (
        "import sys\n"
        "from sentinel.examples import tiny_gpt\n"
        "def small(): return tiny_gpt.GPT(tiny_gpt.GPTConfig(n_layer=24, n_embd=256, init='small_scaled'))\n"
        "tiny_gpt.small = small\n"
        "from sentinel.cli import main\n"
        "sys.exit(main(['audit', 'sentinel.examples.tiny_gpt:small', '--no-meta']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    out = done.stdout
    assert "== takase: fail" in out and "condition 2, large shortcut: embedding-output std" in out
    assert "FFN bound (15)" in out and "attn bound (20)" in out
    assert "fix: Scaled Embed" in out and "result: fail; roles ok; takase fail" in out
