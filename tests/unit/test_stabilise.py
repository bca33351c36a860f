"""sentinel.stabilise: each stabiliser against a direct computation, and the config hooks on a real model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from sentinel.examples.tiny_gpt import GPT, GPTConfig

import sentinel
from sentinel import stabilise


def test_z_loss_is_coef_times_mean_squared_log_partition() -> None:
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    direct = 1e-4 * torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits.reshape(-1, 11)]).mean()
    got = sentinel.z_loss(logits)
    assert torch.allclose(got, direct.float(), rtol=1e-6)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_softcap_is_bounded_monotone_and_near_identity_for_small_logits() -> None:
    x = torch.linspace(-1e4, 1e4, 10001, dtype=torch.float64)
    y = stabilise.softcap(x, cap=50.0)
    assert y.abs().max() <= 50.0 and bool((y.diff() >= 0).all())
    small = torch.tensor([0.01, -0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(stabilise.softcap(small, 50.0), 50.0 * torch.tanh(small / 50.0))
    assert torch.allclose(stabilise.softcap(small, 50.0), small, rtol=1e-3)
    with pytest.raises(ValueError, match="cap must be > 0"):
        stabilise.softcap(x, 0.0)


def test_qk_norm_standardises_each_head_vector() -> None:
    q, k = torch.randn(2, 4, 7, 16) * 30 + 5, torch.randn(2, 4, 7, 16) * 0.1
    nq, nk = stabilise.qk_norm(q, k)
    for t in (nq, nk):
        assert torch.allclose(t.mean(-1), torch.zeros(2, 4, 7), atol=1e-5)
        assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 4, 7), atol=1e-3)


def _manual_attention(q, k, v, cap=None):
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    t = q.shape[-2]
    logits = logits.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(logits, -1) @ v


def test_attention_matches_sdpa_and_a_manual_softcapped_reference() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) * 4 for _ in range(3))
    assert torch.allclose(stabilise.attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.allclose(stabilise.attention(q, k, v, cap=5.0), _manual_attention(q, k, v, cap=5.0), atol=1e-10)
    nq, nk = stabilise.qk_norm(q, k)
    assert torch.allclose(stabilise.attention(q, k, v, qk_normalise=True, cap=5.0), _manual_attention(nq, nk, v, 5.0))
    assert not torch.allclose(stabilise.attention(q, k, v, cap=5.0), stabilise.attention(q, k, v))


def test_init_weights_small_and_scaled() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=4, n_embd=256, n_head=4))
    rm = sentinel.roles.assign_roles(gpt)
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    changed = stabilise.init_weights(gpt, rm.role_by_name(), "scaled", d=256, n_layers=4)
    assert sorted(changed) == sorted(rm.names("o") + rm.names("down"))
    for n in changed:
        assert torch.equal(dict(gpt.named_parameters())[n], before[n] / math.sqrt(8))
    stabilise.init_weights(gpt, rm.role_by_name(), "small_scaled", d=256, n_layers=4)
    params = dict(gpt.named_parameters())
    small = math.sqrt(2 / (5 * 256))
    assert params["h.0.mlp.c_fc.weight"].std().item() == pytest.approx(small, rel=0.02)
    assert params["h.0.mlp.c_proj.weight"].std().item() == pytest.approx(small / math.sqrt(8), rel=0.02)
    assert torch.equal(params["h.0.ln_1.weight"], before["h.0.ln_1.weight"])  # norms untouched
    with pytest.raises(ValueError, match="allowed"):
        stabilise.init_weights(gpt, rm.role_by_name(), "xavier", d=256, n_layers=4)


def _attach(gpt: GPT, **stab) -> sentinel.Sentinel:
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    return sentinel.attach(
        gpt, opt, publish={"enabled": False}, control={"enabled": False}, stats={"enabled": False}, stabilise=stab
    )


@pytest.mark.parametrize("flag", ["scaled_embed", "embed_ln"])
def test_embedding_hooks_equal_the_models_own_option_and_go_away_on_close(flag: str, caplog) -> None:
    torch.manual_seed(0)
    hooked = GPT(GPTConfig())
    reference = GPT(GPTConfig(**{flag: True}))
    reference.load_state_dict(hooked.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    plain = hooked(idx)[0]
    with caplog.at_level(logging.WARNING, logger="sentinel"):
        sn = _attach(hooked, **{flag: True})
    assert "changes training, as configured" in caplog.text
    assert torch.allclose(hooked(idx)[0], reference(idx)[0], atol=1e-6)
    assert not torch.allclose(hooked(idx)[0], plain, atol=1e-3)
    sn.close()
    assert torch.equal(hooked(idx)[0], plain)


def test_attach_init_and_conflicting_embedding_options() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_embd=256))
    _attach(gpt, init="small").close()
    assert gpt.h[0].attn.c_attn.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * 256)), rel=0.02)
    with pytest.raises(ValueError, match="alternatives"):
        _attach(GPT(GPTConfig()), scaled_embed=True, embed_ln=True)


def test_qk_norm_and_softcap_train_the_tiny_gpt() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_embd=64, qk_norm=True, softcap=30.0))
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    idx = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(25):
        _, loss = gpt(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # attention logits of order 1, so that a cap of 0.5 matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


def test_hf_attention_with_a_huge_cap_equals_sdpa_and_a_small_cap_changes_it() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the mask path, not only the causal one
    reference = model(ids, attention_mask=mask).logits
    stabilise.use_in_hf_model(model, cap=1e9)
    assert torch.allclose(model(ids, attention_mask=mask).logits, reference, atol=1e-5)
    stabilise.use_in_hf_model(model, cap=0.5)
    assert not torch.allclose(model(ids, attention_mask=mask).logits, reference, atol=1e-3)


def test_hf_attention_qk_norm_equals_normalising_inside_sdpa(monkeypatch) -> None:
    model = _llama()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    name = stabilise.use_in_hf_model(model, qk_normalise=True)
    got = model(ids).logits
    from transformers.integrations import sdpa_attention

    real = sdpa_attention.sdpa_attention_forward

    def normalised(module, q, k, v, mask, **kw):
        return real(module, *stabilise.qk_norm(q, k), v, mask, **kw)

    model.set_attn_implementation("sdpa")
    monkeypatch.setitem(sdpa_attention.__dict__, "sdpa_attention_forward", normalised)
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", normalised)
    assert torch.allclose(model(ids).logits, got, atol=1e-6)
    assert name == "sentinel_qk1_capNone"
