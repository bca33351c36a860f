"""WeSaR on models whose embedding is tied to the output head (GPT-2, nanoGPT): one gate, the head's scale."""

from __future__ import annotations

import statistics

import pytest
import torch
from sentinel.examples.tiny_gpt import GPT, GPTConfig, Windows, stdlib_corpus

import sentinel
from sentinel.optim.base import optimizer_params
from sentinel.optim.wesar import WeSaR

WESAR = {"wesar": {"enabled": True, "init": "wesar"}}


def _tied_tiny_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    model.lm_head.weight = model.wte.weight  # nanoGPT's weight tying
    return model


def _hf_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(x, y)[1]
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def _train(make, optim: dict, steps: int) -> tuple[float, float]:
    """(first-batch loss, mean of the last 10 losses) over ``steps`` AdamW steps on the stdlib corpus."""
    torch.set_num_threads(2)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sn = sentinel.attach(model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=optim)
    data = torch.utils.data.DataLoader(Windows(stdlib_corpus(), 64, length=steps * 8, seed=0), batch_size=8)
    losses = []
    for x, y in data:
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sn.observe(loss=loss)
        losses.append(loss.item())
    sn.close()
    return losses[0], statistics.mean(losses[-10:])


@pytest.mark.parametrize("make, steps", [(_tied_tiny_gpt, 40), (_hf_gpt2, 25)], ids=["nanogpt", "hf-gpt2"])
def test_wesar_init_on_a_tied_head_keeps_the_first_loss_and_trains_as_well(make, steps: int) -> None:
    first_plain, end_plain = _train(make, {}, steps)
    first, end = _train(make, WESAR, steps)
    assert first < 2 * first_plain, (first, first_plain)  # the embedding's std 1 gave 10.98 -> 594 on GPT-2
    assert end < 1.05 * end_plain, (end, end_plain)


def test_a_tied_pair_has_one_gate_at_the_heads_sigma_target() -> None:
    model = _tied_tiny_gpt()
    opt = torch.optim.AdamW(model.parameters())
    sn = sentinel.attach(model, opt, publish={"enabled": False}, stats={"enabled": False}, optim=WESAR)
    wesar = sn.chain.transforms["wesar"]
    assert wesar.tied == {"wte.weight": ["wte.weight", "lm_head.weight"]}
    gates = wesar.gate_of()
    assert "lm_head.weight" not in gates  # one Parameter, one gate
    assert gates["wte.weight"].item() == pytest.approx(64**-0.5 / wesar.sigma)
    assert model.lm_head.weight is model.wte.weight
    sn.close()


def test_two_parameters_on_one_storage_are_refused_by_name() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.data)  # same storage, two Parameters
    opt = torch.optim.AdamW(model.parameters())
    params, _ = optimizer_params(opt)
    names = tuple(n for n, _ in model.named_parameters())
    roles = {"wte.weight": "embedding", "lm_head.weight": "head"}
    with pytest.raises(ValueError, match="'wte.weight' and 'lm_head.weight'"):
        WeSaR(opt, params, names, roles, d=32, d_ffn=128, n_layers=1, init="wesar", model=model)


def test_keep_on_a_tied_model_leaves_its_function_unchanged() -> None:
    model = _tied_tiny_gpt()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    before = model(x)[0]
    opt = torch.optim.AdamW(model.parameters())
    sn = sentinel.attach(
        model, opt, publish={"enabled": False}, stats={"enabled": False}, optim={"wesar": {"enabled": True}}
    )
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)
    sn.close()
