"""The zoo's models and scenarios are well formed: every model kind builds in code and trains a
step, and sentinel finds its roles structurally (the held-out kinds are the zoo's check that the
defaults carry over to models nobody here wrote, so a kind that silently lost its attention
probes would make that check meaningless)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sentinel  # noqa: E402
from benchmarks.zoo.models import HF, ModelSpec, build, forward  # noqa: E402
from benchmarks.zoo.scenarios import HELDOUT, SCENARIOS  # noqa: E402

KINDS = ["gpt", "plain", *HF]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_trains_a_step_and_has_its_attention_found(kind: str, caplog) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(kind=kind, n_layer=1, n_embd=32, n_head=2, block_size=16)
    model = build(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, spec.block_size))
    logits, loss = forward(model, x, x)
    assert logits.shape == (2, spec.block_size, 256) and torch.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    config = {"publish": {"enabled": False}, "control": {"enabled": False}, "probes": {"enabled": True}}
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        sn = sentinel.attach(model, opt, config=config)
    sn.close()
    assert "sentinel roles:" not in caplog.text, caplog.text  # no matrix without a role, no block without attention


def test_scenario_names_are_unique_and_every_divergent_one_has_a_twin_without_its_cause() -> None:
    names = [s.name for s in (*SCENARIOS, *HELDOUT)]
    assert len(names) == len(set(names))
    for s in (*SCENARIOS, *HELDOUT):
        if s.clean:
            continue
        twin = s.twin()
        assert twin.clean and twin.lr_jump is None and twin.bad is None and twin.nan_step is None
        assert twin != s
