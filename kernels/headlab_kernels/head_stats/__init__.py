"""Streaming statistics of attention heads without materialising the `[B, H, T, S]` pattern.

`head_stats` computes, per query, the top-k keys and their weights, the log-sum-exp and the entropy;
per query and key set, the attention mass on the set; per key, the attention received (summed over
queries) and how many queries can see it (ACT's column score is their ratio). On CUDA tensors it runs
the Triton kernels of `kernels.head_stats.triton`; elsewhere the chunked torch reference of
`kernels.head_stats.reference`. Both are checked against `head_stats_materialised`
(`kernels.head_stats.spec`), the O(T²) definition that materialises the full pattern.
"""

from __future__ import annotations

import os
from typing import Literal, Mapping

import torch

from .common import HeadStats
from .reference import head_stats_reference
from .spec import head_stats_materialised

__all__ = ["HeadStats", "head_stats", "head_stats_reference", "head_stats_materialised", "resolve_impl"]


def head_stats(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
               key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, topk: int = 1,
               impl: Literal["auto", "triton", "torch", "reference"] = "auto") -> HeadStats:
    """Per-query, per-set and per-key statistics of softmax(scale · q kᵀ) over the visible keys.

    Args:
        q: `[B, Hq, T, D]`, any float dtype; the math is float32.
        k: `[B, Hkv, S, D]` with Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        scale: the softmax scale applied to q·k.
        causal: query i sees keys j <= i + S - T (bottom-right aligned when S > T).
        mask: bool `[B|1, 1, T, S]`, True = may attend (an additive float mask is accepted too). It is
            intersected with `causal`: to reproduce sdpa, which ignores `is_causal` when given a mask,
            pass causal=False with a mask (or causal=True when the mask is known to be causal: then
            the kernels skip the blocks above the diagonal).
        key_mask: bool `[B, S]`, True for real keys.
        query_mask: bool `[B, T]`, True for real queries; a padded query sees no key and adds nothing
            to `received` or `n_visible`. Defaults to `key_mask[:, S - T:]` when S >= T.
        key_sets: bool `[K, B|1, S]`, or a dict name -> bool `[B, S]` (then `set_names` follows its order).
        topk: how many top keys to report per query.
        impl: "auto" (Triton on CUDA tensors, the torch reference elsewhere), "triton" (on CPU tensors it
            needs TRITON_INTERPRET=1 set before triton is first imported) or "torch" (the chunked torch
            reference; "reference" is accepted too: the vocabulary of `headlab_kernels.linear_attention`).

    Returns:
        HeadStats: topk_idx / topk_weight `[B, Hq, T, topk]`, lse / entropy `[B, Hq, T]`,
        set_mass `[B, Hq, T, K]`, received `[B, Hq, S]`, n_visible `[B, S]`.

    Raises:
        ValueError: inputs of the wrong shapes or dtypes, or an unknown impl.
        RuntimeError: impl="triton" on CPU tensors without TRITON_INTERPRET=1.
    """
    impl = resolve_impl(impl, q)
    kwargs = dict(scale=scale, causal=causal, mask=mask, key_mask=key_mask, query_mask=query_mask,
                  key_sets=key_sets, topk=topk)
    if impl == "reference":
        return head_stats_reference(q, k, **kwargs)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    from .triton import head_stats_triton

    return head_stats_triton(q, k, **kwargs)


def resolve_impl(impl: str, q: torch.Tensor) -> Literal["triton", "reference"]:
    """The implementation `head_stats(..., impl=impl)` runs for queries `q`: "triton" or "reference".

    Args:
        impl: "auto", "triton", "torch" or "reference".
        q: the queries (their device decides "auto").

    Returns:
        "triton" (for "auto": CUDA tensors with triton importable) or "reference".

    Raises:
        ValueError: an unknown impl.
    """
    if impl not in ("auto", "triton", "torch", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch' ('reference'); got {impl!r}")
    if impl == "auto":
        return "triton" if q.is_cuda and _triton_available() else "reference"
    return "reference" if impl == "torch" else impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
