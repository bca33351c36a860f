"""Forward probes: every value equals a direct computation on a small model, the hooks exist
only on sampled steps, and the agent exports the probe families with label ``module``."""

from __future__ import annotations

import math

import pytest
import torch
from sentinel.examples.tiny_gpt import GPT, GPTConfig

from sentinel.probes import Probes
from sentinel.probes.attention import positions, sdpa_head_max
from sentinel.roles import assign_roles

T = 16


def tiny_gpt(n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, block_size=T, n_embd=32, n_head=4))


def probe(model: torch.nn.Module, run, **kw) -> dict[str, dict[str, torch.Tensor]]:
    """Run one sampled step through ``run(model)``; {stat: {row: value}} plus scalars under ''."""
    p = Probes(model, assign_roles(model), every=1, **kw)
    p.begin_step(0)
    run(model)
    out: dict[str, dict[str, torch.Tensor]] = {"": {}}
    for layout, packed in p.collect():
        n = len(layout.scalars)
        for name, v in zip(layout.scalars, packed[:n]):
            out[""][name] = v
        matrix = packed[n:].reshape(len(layout.tensors), len(layout.stats))
        for j, stat in enumerate(layout.stats):
            out.setdefault(stat, {}).update({row: matrix[i, j] for i, row in enumerate(layout.tensors)})
    assert p.errors == 0
    return out


def record_inputs(model: torch.nn.Module) -> tuple[dict[str, tuple], list]:
    """Inputs (args, kwargs) of every module in the next training forward, by an independent pre-hook
    (the role map's structural trace runs under no_grad, as an evaluation pass would)."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():

        def hook(mod, args, kwargs, name=name):
            if torch.is_grad_enabled():
                seen.setdefault(name, (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), kwargs))

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=rtol, atol=atol)


def test_tiny_gpt_probes_equal_direct_computations():
    model = tiny_gpt()
    idx = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(1))
    seen, handles = record_inputs(model)
    got = probe(model, lambda m: m(idx, idx)[1].backward(), sample=T, top_heads=4)
    for h in handles:
        h.remove()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in ("h.0.attn.c_attn", "h.0.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"):
            y = mods[name](seen[name][0][0])
            close(got["out_rms"][name], y.pow(2).mean().sqrt())
            close(got["out_l2"][name], y.norm())
        assert set(got["out_rms"]) == {
            f"h.{i}.{s}" for i in (0, 1) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        }
        for i in (0, 1):
            x = seen[f"h.{i}"][0][0]
            close(got["resid_std"][f"h.{i}"], x.std(correction=0))
            close(got["norm_in_std"][f"h.{i}.ln_1"], x.std(correction=0))
            # attention logits, all positions (sample = T): exact
            qkv = mods[f"h.{i}.attn.c_attn"](mods[f"h.{i}.ln_1"](x))
            q, k, _ = qkv.split(32, dim=2)
            q, k = (t.view(3, T, 4, 8).transpose(1, 2) for t in (q, k))
            logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
            logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            per_head = logits.amax(dim=(0, 2, 3))
            close(got["attn_logit_max"][f"h.{i}.attn"], per_head.max())
            order = per_head.argsort(descending=True)
            for r in range(4):
                close(got[f"attn_logit_top{r + 1}"][f"h.{i}.attn"], per_head[order[r]])
                assert int(got[f"attn_logit_top{r + 1}_head"][f"h.{i}.attn"]) == int(order[r])
            # Takase's bounds from the live weights and activations
            d, dffn, L = 32, 128, T
            s1 = mods[f"h.{i}.mlp.c_fc"].weight.std(correction=0)
            s2 = mods[f"h.{i}.mlp.c_proj"].weight.std(correction=0)
            so = mods[f"h.{i}.attn.c_proj"].weight.std(correction=0)
            sq = mods[f"h.{i}.attn.c_attn"].weight.std(correction=0)
            sxp = seen[f"h.{i}.ln_2"][0][0].std(correction=0)
            close(got["ffn_grad_bound"][f"h.{i}"], 1 + s1 * s2 / sxp * (math.sqrt(d) + math.sqrt(dffn)) ** 2)
            jz = 4 * (
                (math.sqrt(L) + 2 + 1 / math.sqrt(L)) * sq**3 * math.sqrt(d**3 * 8) + sq * (math.sqrt(d) + math.sqrt(8))
            )
            close(got["attn_grad_bound"][f"h.{i}"], 1 + so / x.std(correction=0) * 2 * math.sqrt(d) * jz)
        close(got["embed_std"]["wte"], model.wte(idx).std(correction=0))
        close(got["embed_std"]["wpe"], model.wpe(torch.arange(T)).std(correction=0))
        close(got["norm_in_std"]["ln_f"], seen["ln_f"][0][0].std(correction=0))
        lz = torch.logsumexp(model.lm_head(seen["lm_head"][0][0]), dim=-1)
        close(got["log_z_mean"]["lm_head"], lz.mean())
        close(got["log_z_max"]["lm_head"], lz.max())
        close(got[""]["log_z_mean"], lz.mean())


def test_sampled_query_positions_bound_the_cost_and_stay_exact_per_row():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 100, 8), torch.randn(2, 3, 100, 8)
    idx = positions(100, 10, q.device)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 99
    assert torch.equal(positions(7, 10, q.device), torch.arange(7))
    full = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    full = full.masked_fill(~torch.ones(100, 100, dtype=torch.bool).tril(), float("-inf"))
    sampled = sdpa_head_max(q, k, is_causal=True, sample=10)
    close(sampled, full[:, :, idx].amax(dim=(0, 2, 3)))
    assert torch.all(sampled <= full.amax(dim=(0, 2, 3)))
    close(sdpa_head_max(q, k, is_causal=True, sample=100), full.amax(dim=(0, 2, 3)))
    # boolean (True = attend) and additive masks, grouped-query keys
    mask = torch.rand(100, 100) > 0.5
    bias = torch.randn(100, 100)
    k2 = torch.randn(2, 1, 100, 8)
    ref = (q @ k2.expand(2, 3, 100, 8).transpose(-1, -2)) * 0.5
    close(
        sdpa_head_max(q, k2, attn_mask=mask, scale=0.5, sample=100),
        ref.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3)),
    )
    close(sdpa_head_max(q, k2, attn_mask=bias, scale=0.5, sample=100), (ref + bias).amax(dim=(0, 2, 3)))


def test_transformer_engine_arguments_are_read_in_their_layout_and_mask_convention():
    """te_head_max on DotProductAttention-style arguments (the real TE run is tests/gpu/test_te_probes.py)."""
    from sentinel.probes.attention import te_head_max

    class FakeDPA(torch.nn.Module):  # the attributes TE's DotProductAttention sets in __init__
        qkv_format, attn_mask_type = "sbhd", "causal"

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)  # sbhd: [batch, heads, seq, dim] as bhsd
    q_sbhd, k_sbhd = q.permute(2, 0, 1, 3), k.permute(2, 0, 1, 3)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    per_head, length = te_head_max(FakeDPA(), (q_sbhd, k_sbhd, None), {}, sample=64)
    assert length == 4
    close(per_head, logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)))
    bshd = {"qkv_format": "bshd", "attn_mask_type": "causal_bottom_right"}
    q_b, k_b = q.transpose(1, 2), k[:, :, :3].transpose(1, 2)  # 4 queries, 3 keys: bottom-right alignment
    ref = ((q @ k[:, :, :3].transpose(-1, -2)) / math.sqrt(8)).masked_fill(
        ~torch.ones(4, 3, dtype=torch.bool).tril(diagonal=-1), float("-inf")
    )
    close(te_head_max(FakeDPA(), (q_b, k_b), bshd, sample=64)[0], ref.amax(dim=(0, 2, 3)))
    pad = torch.zeros(2, 1, 1, 4, dtype=torch.bool)
    pad[:, :, :, -1] = True  # TE: True = masked out
    mod = FakeDPA()
    mod.softmax_scale = 0.25
    got, _ = te_head_max(mod, (q_sbhd, k_sbhd, None, pad), {"attn_mask_type": "padding"}, sample=64)
    close(got, ((q @ k.transpose(-1, -2)) * 0.25)[..., :3].amax(dim=(0, 2, 3)))
    assert te_head_max(FakeDPA(), (q_sbhd.flatten(0, 1), k_sbhd.flatten(0, 1)), {"qkv_format": "thd"}, 64) is None


def test_hooks_exist_only_on_sampled_steps_and_only_the_first_grad_forward_counts():
    model = tiny_gpt(1)
    p = Probes(model, assign_roles(model), every=10)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    idx = torch.randint(0, 256, (2, T))
    for step in range(21):
        p.begin_step(step)
        assert hooks() == (0 if step % 10 else len(p._handles)) and (hooks() > 0) == (step % 10 == 0)
        with torch.no_grad():
            model(idx)  # eval forward: never measured
        assert not p.values
        model(idx)
        model(torch.zeros_like(idx))  # a second micro-batch: not measured again
        groups = p.collect()
        assert bool(groups) == (step % 10 == 0)
        assert hooks() == 0
        if step == 0:  # measured the first grad-enabled forward (idx), not the zeros after it
            fresh = probe(tiny_gpt(1), lambda m: m(idx))
            linear = next(packed for lay, packed in groups if lay.stats == ("out_rms", "out_l2"))
            close(linear[0], fresh["out_rms"]["h.0.attn.c_attn"])


def test_a_forward_that_raises_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack

    model = tiny_gpt(1)
    p = Probes(model, assign_roles(model), every=1)
    p.begin_step(0)
    with pytest.raises(IndexError):
        model(torch.full((1, T), 999))  # out-of-vocabulary token: the embedding raises
    p.collect()
    assert not _get_current_function_mode_stack()
    p.begin_step(1)
    model(torch.zeros(1, T, dtype=torch.long))
    assert any("attn_logit_max" in lay.stats for lay, _ in p.collect())


# -- Hugging Face LLaMA and GPT-2, built from tiny local configs -------------------------------


def llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=impl,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_attention_logits_equal_rope_q_dot_k(impl):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = llama(impl)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    seen, handles = record_inputs(model)
    got = probe(model, lambda m: m(input_ids=ids, labels=ids).loss.backward(), sample=64)
    for h in handles:
        h.remove()
    for i in (0, 1):
        attn = model.model.layers[i].self_attn
        args, kwargs = seen[f"model.layers.{i}.self_attn"]
        h = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            q = attn.q_proj(h).view(2, 12, 4, 8).transpose(1, 2)
            k = attn.k_proj(h).view(2, 12, 2, 8).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * attn.scaling
            logits = logits.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
        close(got["attn_logit_max"][f"model.layers.{i}.self_attn"], logits.max())
        close(got["resid_std"][f"model.layers.{i}"], seen[f"model.layers.{i}"][0][0].std(correction=0))
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"} <= set(got["out_rms"])
    assert set(got["log_z_max"]) == {"lm_head"} and set(got["embed_std"]) == {"model.embed_tokens"}
    assert "model.norm" in got["norm_in_std"] and set(got["ffn_grad_bound"]) == {"model.layers.0", "model.layers.1"}


def test_gpt2_eager_and_sdpa_agree_and_use_conv1d_outputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    results = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation=impl)
        model = GPT2LMHeadModel(cfg)
        results.append(probe(model, lambda m: m(input_ids=ids, labels=ids).loss.backward()))
    eager, sdpa = results
    assert set(eager["attn_logit_max"]) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    for row, v in eager["attn_logit_max"].items():
        close(v, sdpa["attn_logit_max"][row])
    assert "transformer.h.0.attn.c_attn" in eager["out_rms"]
    assert set(eager["log_z_mean"]) == {"lm_head"}  # the tied head keeps its own role


# -- through sentinel.attach to a real agent ---------------------------------------------------


def test_attached_probes_reach_the_agent_as_module_families_and_feed_its_predictors(start_agent):
    from sentinel.examples.tiny_gpt import TrainConfig, make_run

    import sentinel

    # out_rms and log_z limits the first probed values reach: the predictors must read the probe rows
    predict = {"trend": {"warmup_steps": 0, "baseline_points": 1}}
    predict["out_rms"] = {"enabled": True, "max_growth": 1.0, "watch_from": 1.0}  # off by default (docs/policy.md)
    predict["log_z"] = {"max_drift": 1e-6, "watch_drift": 0.0}
    agent = start_agent(config={"predict": predict})
    model, opt, _, loader = make_run(TrainConfig(steps=4, batch_size=2), GPTConfig(n_layer=2, block_size=32))
    sn = sentinel.attach(
        model, opt, run="probes", publish={"endpoint": agent.stats_endpoint}, control={"enabled": False},
        probes={"enabled": True, "every": 2},
    )  # fmt: skip
    with sn:
        for step, (x, y) in enumerate(loader):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sn.observe(loss=loss)
            if step == 2:
                break
    families = {
        "sentinel_layer_output_rms": "h.0.attn.c_attn",
        "sentinel_layer_output_l2_norm": "h.1.mlp.c_proj",
        "sentinel_layer_attention_logit_max": "h.0.attn",
        "sentinel_layer_residual_std": "h.1",
        "sentinel_layer_log_z_max": "lm_head",
        "sentinel_layer_log_z_mean": "lm_head",
        "sentinel_layer_embedding_std": "wte",
        "sentinel_layer_norm_input_std": "ln_f",
        "sentinel_layer_ffn_grad_norm_bound": "h.0",
        "sentinel_layer_attention_grad_norm_bound": "h.1",
    }

    def ready(s) -> bool:
        found = all(s.value(f, module=m, run="probes") is not None for f, m in families.items())
        # the step's own message follows its probe messages, so the loss is back once it arrived
        return found and s.value("sentinel_training_step", run="probes") == 2 and s.value("sentinel_loss") is not None

    scrape = agent.wait_for(ready)
    assert len(scrape.samples("sentinel_layer_attention_head_logit_max")) == 2 * 4
    assert set(scrape.samples("sentinel_layer_output_rms")[0][0]) == {"run", "rank", "module"}
    assert 0 < scrape.value("sentinel_layer_attention_logit_max", module="h.0.attn") < 1e4
    assert not scrape.samples("sentinel_param_out_rms")
    detections = {lab["detector"] for lab, v in scrape.samples("sentinel_detections_total") if v > 0}
    assert {"out_rms", "log_z"} <= detections, scrape.samples("sentinel_detections_total")


def test_an_unrecognised_attention_drops_its_rows_and_the_bounds_not_the_rest(caplog):
    class ExpAttention(torch.nn.Module):
        """Attention by exp/sum: neither SDPA nor softmax, so the logit probe cannot see it."""

        def __init__(self, inner):
            super().__init__()
            self.c_attn, self.c_proj, self.n_head = inner.c_attn, inner.c_proj, inner.n_head

        def forward(self, x):
            B, L, C = x.shape
            q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
            w = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
            w = w * torch.ones(L, L).tril()
            y = (w / w.sum(-1, keepdim=True)) @ v
            return self.c_proj(y.transpose(1, 2).reshape(B, L, C))

    model = tiny_gpt(1)
    model.h[0].attn = ExpAttention(model.h[0].attn)
    with caplog.at_level("WARNING", logger="sentinel"):
        got = probe(model, lambda m: m(torch.zeros(2, T, dtype=torch.long)))
    assert "attn_logit_max" not in got and "ffn_grad_bound" not in got
    assert set(got["resid_std"]) == {"h.0"} and "h.0.attn.c_attn" in got["out_rms"]
    assert any("h.0.attn made no scaled_dot_product_attention" in r.getMessage() for r in caplog.records)
