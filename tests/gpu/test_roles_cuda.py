"""The structural role trace and the attention-logit probe on CUDA, whatever SDPA backend runs.

On CUDA, ``scaled_dot_product_attention`` dispatches to the flash, memory-efficient or cuDNN
kernels, none of which materialise the logits; the trace records the call itself and the probe
recomputes q·k from the call's arguments, so both must hold on every backend.  Skipped
without CUDA: ``python -m pytest tests/gpu/test_roles_cuda.py`` on a GPU machine.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_zoo import LAYERS, ZOO  # noqa: E402

from sentinel.model_call import example_ids, forward_loss  # noqa: E402
from sentinel.probes import Probes  # noqa: E402
from sentinel.roles import assign_roles  # noqa: E402

BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["plain_qkv_proj_fc", "hf_llama", "hf_qwen2_moe"])
def test_roles_and_logit_probe_on_every_sdpa_backend(name: str, backend: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    build, expected = ZOO[name]
    model = build().cuda().to(torch.bfloat16)
    rm = assign_roles(model)
    assert {n: r.role for n, r in rm.items() if r.is_matrix} == expected
    probes = Probes(model, rm, every=1, sample=64)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen[f"call{len(seen)}"] = (q.detach().float(), k.detach().float(), kwargs.get("scale"))
        return real_sdpa(q, k, v, *args, **kwargs)

    probes.begin_step(0)
    ids = example_ids(model, seq=16, batch=2)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            torch.nn.functional.scaled_dot_product_attention = spy
            forward_loss(model, ids).backward()
    except RuntimeError as exc:  # a backend this GPU or dtype does not offer
        pytest.skip(f"{backend}: {exc}")
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    rows = {}
    for layout, packed in probes.collect():
        if "attn_logit_max" in layout.stats:
            m = packed.reshape(len(layout.tensors), len(layout.stats))
            rows = dict(zip(layout.tensors, m[:, layout.stats.index("attn_logit_max")].tolist()))
    assert len(rows) == LAYERS
    for (q, k, scale), got in zip(seen.values(), rows.values()):
        if k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        logits = (q @ k.transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        want = logits.masked_fill(~causal, float("-inf")).max().item()
        assert got == pytest.approx(want, rel=2e-2, abs=2e-2)
