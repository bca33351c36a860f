"""How to call a user's model on token ids and read its logits or loss, whatever its convention.

Why: the structural role trace (sentinel/role_trace.py) and ``sentinel audit``'s numeric checks
both run the model once on a few tokens, and models answer in many ways: nanoGPT's
``forward(idx, targets=None)`` returns ``(logits, loss)`` with logits for the last position
only when no targets are given; Hugging Face models return a ``ModelOutput`` (``.logits``,
``.loss`` when ``labels`` are passed); others return a bare tensor, a tuple or a dict.
:func:`forward_loss` tries, in order: the model's own loss with targets (``targets=`` /
``labels=`` / a second positional argument), then cross-entropy on full-sequence logits, and
raises :class:`ModelCallError` naming what it tried (``sentinel audit --loss`` and
``--input-shape`` take over where nothing fits).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ModelCallError", "call_model", "example_ids", "forward_loss", "logits_of", "loss_of", "unwrap"]


class ModelCallError(Exception):
    """The model could not be called on token ids, or gave no logits or loss sentinel can read."""


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The module to run locally: DDP's ``.module``, ``torch.compile``'s ``_orig_mod``; None (and why)
    under FSDP, whose forward all-gathers across ranks and must not run on one rank alone."""
    seen = 0
    while seen < 4:
        seen += 1
        name = type(model).__name__
        if name in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            break
    if type(model).__name__ == "FullyShardedDataParallel" or any(
        type(p).__name__ == "DTensor" or "_flat_param" in n for n, p in model.named_parameters()
    ):
        return None, "sharded parameters (FSDP/DTensor): a forward on one rank alone would wait on the others"
    return model, ""


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def example_ids(model: torch.nn.Module, seq: int = 8, batch: int = 1, vocab: int | None = None) -> torch.Tensor:
    """``batch x seq`` token ids below ``vocab`` (default: the smallest embedding's rows, at most 256)."""
    if vocab is None:
        rows = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        vocab = min([256, *rows])
    device = _device(model)
    ids = torch.arange(1, batch * seq + 1).reshape(batch, seq) % max(vocab - 1, 1) + (1 if vocab > 2 else 0)
    return ids.to(device) if device.type != "meta" else ids.to("meta")


def _accepts(model: torch.nn.Module, name: str, named_only: bool = False) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (not named_only and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def call_model(model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    """``model(ids, **kwargs)``, with ``use_cache=False`` where the forward takes it (no KV cache kept)."""
    if _accepts(model, "use_cache", named_only=True):
        kwargs.setdefault("use_cache", False)
    return model(ids, **kwargs)


def logits_of(out: Any) -> torch.Tensor | None:
    """The logits in a model's output: a tensor, the first of a tuple/list, ``["logits"]`` or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        try:
            value = out["logits"]
        except (KeyError, TypeError):
            value = None
        if isinstance(value, torch.Tensor):
            return value
    value = getattr(out, "logits", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def loss_of(out: Any) -> torch.Tensor | None:
    """A scalar loss in a model's output: a 0-d tensor, ``.loss``/``["loss"]``, or a 0-d item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else None
    for value in (getattr(out, "loss", None), out.get("loss") if isinstance(out, dict) else None):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return value
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor) and item.dim() == 0:
                return item
    return None


def forward_loss(
    model: torch.nn.Module, ids: torch.Tensor, loss_hook: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None
) -> torch.Tensor:
    """A scalar loss of ``model`` on ``ids`` (next-token prediction on the same tokens).

    ``loss_hook(model, ids)`` decides when given.  Otherwise the model's own loss, called with
    ``targets=ids``, ``labels=ids`` or ``(ids, ids)``, is taken first; else cross-entropy of the
    logits of ``model(ids)`` when they cover every position.
    """
    if loss_hook is not None:
        out = loss_hook(model, ids)
        loss = out if isinstance(out, torch.Tensor) and out.dim() == 0 else loss_of(out)
        if loss is None:
            raise ModelCallError(f"the --loss hook returned {type(out).__name__}, not a scalar tensor")
        return loss
    tried = []
    for how, kwargs, args in (
        ("targets=ids", {"targets": ids}, ()),
        ("labels=ids", {"labels": ids}, ()),
        ("model(ids, ids)", {}, (ids,)),
    ):
        if kwargs and not _accepts(model, next(iter(kwargs))):
            continue
        try:
            out = model(ids, *args) if args else call_model(model, ids, **kwargs)
        except Exception as exc:
            tried.append(f"{how}: {type(exc).__name__}: {exc}")
            continue
        loss = loss_of(out)
        if loss is not None:
            return loss
        tried.append(f"{how}: no scalar loss in the output ({type(out).__name__})")
    try:
        out = call_model(model, ids)
    except Exception as exc:
        raise ModelCallError(
            f"model(ids) with ids of shape {tuple(ids.shape)} raised {type(exc).__name__}: {exc}"
        ) from exc
    logits = logits_of(out)
    if logits is None:
        raise ModelCallError(f"model(ids) returned {type(out).__name__} with no logits; tried: {'; '.join(tried)}")
    if logits.dim() < 2 or logits.shape[:-1] != ids.shape:
        raise ModelCallError(
            f"model(ids) returned logits of shape {tuple(logits.shape)} for ids {tuple(ids.shape)} (not one row per "
            "position, e.g. the last position only) and no loss when given targets"
            + (f"; tried: {'; '.join(tried)}" if tried else "")
        )
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())
