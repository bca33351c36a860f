"""What the role map could not find is said once, loudly, with a snippet that fixes it, and counted
on the wire (``roles_unassigned_matrices``) where the agent exports it as a gauge."""

from __future__ import annotations

import logging
import textwrap

import torch
import torch.nn as nn
import yaml
from agent_proc import make_frames
from test_agent_metrics import Fixture
from test_row_roles import _train_step, attach_capturing

import sentinel
from sentinel.role_report import find_gaps, overrides_snippet
from sentinel.roles import assign_roles


class NoAttention(nn.Module):
    """Blocks that mix tokens by exp(): no SDPA, no softmax, no name a preset knows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(mix=nn.Linear(16, 16), out=nn.Linear(16, 16))) for _ in range(2))
        self.head = nn.Linear(16, 32)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = h + b["out"](torch.exp(b["mix"](h)))
        return self.head(h)


def warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "sentinel roles" in r.getMessage()
    ]


def test_attach_warns_once_with_every_gap_the_features_off_and_a_snippet_that_fixes_them(caplog):
    torch.manual_seed(0)
    model = NoAttention()
    opt = torch.optim.AdamW(model.parameters())
    with caplog.at_level(logging.INFO, logger="sentinel"):
        sn, cap = attach_capturing(
            model, opt, optim={"clamp": {"enabled": True, "default": 0.1}}, probes={"enabled": True}
        )
        for _ in range(3):
            _train_step(model, opt, sn, torch.randint(0, 32, (2, 8)))
    sn.close()
    [text] = warnings(caplog)  # once, not per step
    for name in ("blocks.0.mix.weight", "blocks.0.out.weight", "blocks.1.mix.weight", "blocks.1.out.weight"):
        assert name in text
    assert "2 blocks where no attention was found" in text and "update-ratio clamp" in text
    assert "no attn_logit_max" in text
    snippet = textwrap.dedent(text[text.index("\n  roles:\n") + 1 :])
    overrides = yaml.safe_load(snippet)["roles"]["overrides"]
    assert set(overrides) == {r"blocks\.\d+\.mix\.weight", r"blocks\.\d+\.out\.weight"}
    assert set(overrides.values()) == {"REPLACE_ME"}  # no name hint: the user must decide, the config refuses it
    scalars = [
        dict(zip(lay.scalars, data[: len(lay.scalars)])) for _, lay, data in cap.messages if "loss" in lay.scalars
    ]
    assert len(scalars) == 3
    assert all(s["roles_unassigned_matrices"] == 4 and s["roles_blocks_without_attention"] == 2 for s in scalars)

    fixed = {k: "up" if "mix" in k else "down" for k in overrides}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sentinel"):
        sn = sentinel.attach(model, opt, publish={"enabled": False}, roles={"overrides": fixed})
    assert sn.role_gaps.unassigned == [] and sn.role_gaps.scalars()["roles_unassigned_matrices"] == 0
    assert all("without a role" not in w for w in warnings(caplog))
    sn.close()


def test_snippet_hints_come_from_names_and_are_marked():
    text = overrides_snippet(["layers.0.mixer.router.weight", "layers.1.mixer.router.weight", "x.0.w2.weight"])
    data = yaml.safe_load(text)["roles"]["overrides"]
    assert data == {r"layers\.\d+\.mixer\.router\.weight": "router", r"x\.\d+\.w2\.weight": "down"}
    assert text.count("# from the name: check it") == 2


def test_a_complete_model_has_no_gaps_and_says_nothing(caplog):
    from sentinel.examples.tiny_gpt import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4))
    gaps = find_gaps(assign_roles(model))
    assert not gaps.any and gaps.scalars() == {"roles_unassigned_matrices": 0.0, "roles_blocks_without_attention": 0.0}


def test_the_agent_exports_the_counts_as_gauges():
    f = Fixture()
    scalars = {"loss": 2.0, "roles_unassigned_matrices": 4.0, "roles_blocks_without_attention": 2.0}
    assert f.send(make_frames(run="r", rank=0, step=3, scalars=scalars)) is not None
    s = f.scrape()
    assert s.value("sentinel_roles_unassigned_matrices", run="r", rank="0") == 4
    assert s.value("sentinel_roles_blocks_without_attention", run="r", rank="0") == 2


def test_a_forward_the_trace_cannot_call_falls_back_to_the_presets_with_a_warning(caplog):
    """A model taking a dict batch: the trace fails, attach says so once, the presets still work."""
    from sentinel.examples.tiny_gpt import GPT, GPTConfig

    class DictBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4))

        def forward(self, batch):
            return self.gpt(batch["ids"])

    model = DictBatch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="sentinel"):
        sn = sentinel.attach(model, torch.optim.AdamW(model.parameters()), publish={"enabled": False})
    sn.close()
    [text] = warnings(caplog)
    assert "forward on 8 tokens raised" in text and "presets assigned every matrix" in text
    assert sn.role_gaps.unassigned == [] and model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    rm = assign_roles(model)
    assert rm["gpt.h.0.attn.c_attn.weight"].role == "qkv" and any("structure not traced" in n for n in rm.notes)


def test_an_unrecognised_attention_is_never_read_as_an_mlp():
    """Sigmoid attention (no softmax, no SDPA): its q/k/v and o matrices must not become up and down."""

    class SigmoidAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.o, self.head = (
                nn.Embedding(32, 16),
                nn.Linear(16, 48),
                nn.Linear(16, 16),
                nn.Linear(16, 32),
            )

        def forward(self, ids):
            q, k, v = self.mix(self.emb(ids)).split(16, dim=-1)
            return self.head(self.o(torch.sigmoid(q @ k.transpose(-1, -2)) @ v))

    rm = assign_roles(SigmoidAttention())
    assert {n: r.role for n, r in rm.items() if r.is_matrix} == {"emb.weight": "embedding", "head.weight": "head"}
    assert sorted(rm.unassigned) == ["mix.weight", "o.weight"]


def test_a_plain_linear_named_qkv_is_not_read_as_te_interleaved():
    """The report that started this: the te preset read a torch nn.Linear `qkv` as TE's interleaved QKV."""
    from test_row_roles import Unfamiliar

    rm = assign_roles(Unfamiliar(), structure=False)  # names only: the te preset's `qkv.weight` rule
    parts = rm["blocks.0.attn.qkv.weight"].fused_parts
    assert parts.layout == "contiguous" and "torch nn.Linear" in parts.rule
