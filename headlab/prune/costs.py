"""What a structurally pruned model saves (parameters, KV-cache bytes, forward time) and whether it is exact."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Iterable

import torch

from headlab.edits.heads import ablate, edit
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel
from headlab.models.pruned import pruned_layouts


def param_count(model: HeadModel, *, attention_only: bool = False) -> int:
    """Number of parameters (shared/tied ones counted once), or only those of the attention modules.

    Args:
        model: a HeadModel.
        attention_only: count only the attention modules and their output projections.

    Returns:
        The parameter count.
    """
    if not attention_only:
        return sum(p.numel() for p in model.hf.parameters())
    seen: set[int] = set()
    total = 0
    for layer in range(model.n_layers):
        for p in list(model.attention_module(layer).parameters()) + list(model.out_proj(layer).parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def kv_bytes_per_token(model: HeadModel) -> int:
    """KV-cache bytes per token of one sequence: Σ_layers 2 (k and v) · KV heads · D · bytes.

    Args:
        model: a HeadModel (a structurally pruned one counts each layer's kept KV groups).

    Returns:
        Bytes per token, in the model's dtype.
    """
    layouts = pruned_layouts(model)
    groups = [len(lay.kv) for lay in layouts] if layouts is not None else [model.n_kv_heads] * model.n_layers
    return 2 * sum(groups) * model.head_dim * model.dtype.itemsize


@torch.no_grad()
def measured_kv_bytes(model: HeadModel, n_tokens: int = 16) -> int:
    """KV-cache bytes actually held after a cached forward of `n_tokens` tokens (one sequence).

    Args:
        model: a causal-LM HeadModel.
        n_tokens: the length of the forward (pad tokens).

    Returns:
        The bytes of every key and value tensor in the returned cache.
    """
    ids = torch.full((1, n_tokens), model.pad_id, dtype=torch.long, device=model.device)
    _, cache = model.forward_cached(ids)
    cache = getattr(cache, "self_attention_cache", cache)
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def forward_seconds(models: dict[str, HeadModel], *, seq_len: int = 256, batch: int = 1, repeats: int = 5,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Median forward (prefill) time of each model on the same random tokens `[batch, seq_len]`.

    The models run interleaved (A B A B …) after one warm-up each, so slow drifts of a shared machine
    hit them alike.

    Args:
        models: {name: HeadModel}, all with one vocabulary and device (the first one's are used).
        seq_len: tokens per sequence.
        batch: sequences per forward.
        repeats: timed forwards per model.
        seed: seed of the random tokens.

    Returns:
        {name: {"median_s", "min_s", "runs"}}.
    """
    first = next(iter(models.values()))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(first.vocab_size, (batch, seq_len), generator=gen).to(first.device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.hf(input_ids=ids)
    for _ in range(repeats):
        for name, m in models.items():
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            m.hf(input_ids=ids)
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)} for name, ts in times.items()}


def compare(original: HeadModel, pruned: HeadModel) -> dict[str, float]:
    """Parameter and KV-cache ratios (pruned / original), whole model and attention only.

    Args:
        original: the unpruned HeadModel.
        pruned: its structurally pruned copy (`remove_heads` / `load_pruned`).

    Returns:
        {"params", "params_pruned", "params_ratio", "attn_params_ratio", "kv_bytes_per_token",
        "kv_bytes_per_token_pruned", "kv_ratio"}.
    """
    return {
        "params": param_count(original), "params_pruned": param_count(pruned),
        "params_ratio": param_count(pruned) / param_count(original),
        "attn_params_ratio": param_count(pruned, attention_only=True) / param_count(original, attention_only=True),
        "kv_bytes_per_token": kv_bytes_per_token(original), "kv_bytes_per_token_pruned": kv_bytes_per_token(pruned),
        "kv_ratio": kv_bytes_per_token(pruned) / kv_bytes_per_token(original),
    }


def _as_float64(model: HeadModel) -> HeadModel:
    return HeadModel(copy.deepcopy(model.hf).double(), model.tokenizer, name=model.name)


@torch.no_grad()
def equality(original: HeadModel, pruned: HeadModel, heads: Iterable[HeadRef], tokens: Any) -> dict[str, float]:
    """Max |Δlogit| of the pruned model against the masked original (`heads` zero-ablated), on `tokens`.

    Args:
        original: the unpruned HeadModel.
        pruned: the structurally pruned model.
        heads: the heads that were removed (zero-ablated in the original).
        tokens: the prompt, anything `HeadModel.encode` reads.

    Returns:
        {"max_abs_diff": in the models' own dtype, "max_abs_diff_float64": with both models copied to float64 (the
        test that the two compute the same function), "rounding_of_masked": the masked model's own rounding error
        (its dtype against float64, the yardstick for the first), "logit_scale": max |logit|}.
    """
    heads = list(heads)
    with edit(original, ablate(heads)):
        masked = original.forward(tokens).logits.double()
    native = float((pruned.forward(tokens).logits.double() - masked).abs().max())
    wide, wide_pruned = _as_float64(original), _as_float64(pruned)
    with edit(wide, ablate(heads)):
        masked64 = wide.forward(tokens).logits
    return {"max_abs_diff": native,
            "max_abs_diff_float64": float((wide_pruned.forward(tokens).logits - masked64).abs().max()),
            "rounding_of_masked": float((masked - masked64).abs().max()), "logit_scale": float(masked64.abs().max())}
