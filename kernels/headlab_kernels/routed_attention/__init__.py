"""Routed (mixture-of-head) causal attention: compute only the (token, head) rows whose gate is on.

Mixture-of-Head attention (MoH) gates each head's output per token,
o[b, t, h, :] = gates[b, t, h] · Attn_h(q[b, h, t], k[b, g(h), :t+1], v[b, g(h), :t+1]), with
gates = 0 for the heads that are off for that token and g(h) = h // (H // G) (grouped-query heads).
Dense attention computes every (token, head) and multiplies by the gates; the routed paths compute
only the active rows.

`routed_attention` dispatches between the Triton forward kernel of
`headlab_kernels.routed_attention.triton` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
the torch routed path `reference.routed_torch` and the dense definition `reference.dense_gated`
(which both routed paths are checked against). `routed_costs` counts what routing saves: attention
FLOPs of the active rows against those of every row, and the key/value cache reads of a decode step
(a group's cache is read for a token only when one of its query heads is on).

Inputs: q `[B, H, T, D]`, k and v `[B, G, T, D]`, gates `[B, T, H]` (0 = off), key_mask bool
`[B, T]` (False = padding key). Output `[B, T, H, D]`, float32 (float64 on the torch paths for
float64 q).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .reference import dense_gated, routed_torch

__all__ = ["dense_gated", "resolve_impl", "routed_attention", "routed_costs", "routed_torch"]

Impl = Literal["auto", "triton", "torch", "reference", "dense"]
_IMPLS = ("auto", "triton", "torch", "reference", "dense")  # "reference" = "torch", as in the other packages


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                     scale: float | None = None, key_mask: torch.Tensor | None = None,
                     impl: Impl = "auto") -> torch.Tensor:
    """Gated causal attention computing only the active (b, h, t) rows (gates != 0).

    Args:
        q: `[B, H, T, D]`.
        k: `[B, G, T, D]` with H % G == 0 (head h reads group h // (H // G)).
        v: `[B, G, T, D]`.
        gates: `[B, T, H]`, finite; 0 = head off for that token, any other value scales its output.
        scale: softmax scale (default D ** -0.5).
        key_mask: bool `[B, T]`, False = padding key; a query that sees no real key gets 0.
        impl: "auto" (Triton on CUDA tensors when triton imports and q is not float64, the torch
            routed path elsewhere), "triton" (on CPU tensors it needs TRITON_INTERPRET=1 set before
            triton is first imported), "torch" (the torch routed path; "reference" is accepted too,
            the vocabulary of the other kernel packages) or "dense" (the definition: every row, then
            the gate multiply).

    Returns:
        `[B, T, H, D]` = gates[..., None] · attention output; float32 (float64 for float64 q on the
        torch and dense paths). Bad inputs raise ValueError naming the problem.
    """
    impl = resolve_impl(impl, q)
    if impl == "dense":
        return dense_gated(q, k, v, gates, scale=scale, key_mask=key_mask)
    if impl == "torch":
        return routed_torch(q, k, v, gates, scale=scale, key_mask=key_mask)
    from .triton import routed_triton

    return routed_triton(q, k, v, gates, scale=scale, key_mask=key_mask)


def resolve_impl(impl: str, q: torch.Tensor) -> Literal["triton", "torch", "dense"]:
    """The path `routed_attention(..., impl=impl)` runs for queries `q`: "triton", "torch" or "dense".

    Args:
        impl: "auto", "triton", "torch", "reference" or "dense".
        q: the queries (their device and dtype decide "auto").

    Returns:
        "triton" (for "auto": non-float64 CUDA tensors with triton importable), "torch" or "dense".

    Raises:
        ValueError: an unknown impl.
        RuntimeError: impl="triton" without triton, or on CPU tensors without TRITON_INTERPRET=1.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton', 'torch' ('reference') or 'dense'; got {impl!r}")
    if impl == "reference":
        return "torch"
    if impl == "auto":
        usable = isinstance(q, torch.Tensor) and q.is_cuda and q.dtype != torch.float64
        return "triton" if usable and _triton_available() else "torch"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError("impl='triton' needs the triton package (the 'kernels' extra); use impl='torch'")
        if isinstance(q, torch.Tensor) and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return impl


def routed_costs(gates: torch.Tensor, n_kv_groups: int, head_dim: int, *,
                 key_mask: torch.Tensor | None = None) -> dict:
    """What routing saves, counted from the gates: attention FLOPs and a decode step's KV-cache reads.

    A query row at position t against its causal prefix of n_t = t + 1 keys costs 4 · n_t · D FLOPs
    (2 · n_t · D for q·k, 2 · n_t · D for the weighted sum of v). Dense attention computes every
    (b, t, h) row; the routed paths only the active ones (gates != 0). For decode, the key/value cache
    of group g (query heads g·R .. g·R + R - 1, R = H // G) is read at token t only when at least one
    of those heads is active at t.

    Args:
        gates: `[B, T, H]` (0 = off; bool accepted).
        n_kv_groups: G, the number of key/value heads (H % G == 0; G = H without GQA).
        head_dim: D.
        key_mask: bool `[B, T]`, False = padding. Padding is counted as absent, as in an unpadded
            (varlen) batch: padded positions are neither query rows (in any count below) nor keys
            (a real query at t has n_t = its number of real keys at positions <= t).

    Returns:
        dict with the exact counts as ints and the ratios as floats (NaN when there is no real token):
        dense_flops, routed_flops, flops_ratio (routed / dense); n_pairs (real (token, head) pairs),
        n_active (active ones), active_fraction; kv_pairs (real (token, group) pairs), kv_reads (those
        whose cache is read), kv_read_fraction; kv_read_key_fraction (the same weighted by the n_t keys
        each read touches: the share of the cache bytes a decode step streams).
    """
    if not isinstance(gates, torch.Tensor) or gates.dim() != 3:
        got = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a tensor [B, T, H]; got {got}")
    B, T, H = gates.shape
    if isinstance(n_kv_groups, bool) or not isinstance(n_kv_groups, int) or n_kv_groups < 1 or H % n_kv_groups:
        raise ValueError(f"n_kv_groups must be a positive int dividing the number of heads H={H}; got {n_kv_groups!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
    if gates.dtype != torch.bool and not gates.is_floating_point():
        raise ValueError(f"gates must be a floating-point (or bool) tensor [B, T, H]; got {gates.dtype}")
    if gates.is_floating_point() and gates.numel() and not bool(torch.isfinite(gates).all()):
        raise ValueError("gates must be finite: some values are NaN or infinite")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or tuple(key_mask.shape) != (B, T) or key_mask.is_floating_point():
            got = tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
            raise ValueError(f"key_mask must be a bool tensor [B, T] = [{B}, {T}]; got {got}")
        real = key_mask.to(device=gates.device, dtype=torch.bool)
        n_keys = torch.cumsum(real.to(torch.int64), 1)  # real keys at positions <= t
    else:
        real = torch.ones(B, T, dtype=torch.bool, device=gates.device)
        n_keys = torch.arange(1, T + 1, device=gates.device, dtype=torch.int64).expand(B, T)
    G, D = n_kv_groups, head_dim
    active = (gates != 0) & real[..., None]  # [B, T, H]
    row_cost = 4 * D * n_keys * real  # [B, T]: one query row's FLOPs; 0 at padding
    dense = int(row_cost.sum()) * H
    routed = int((row_cost * active.sum(-1)).sum())
    group_on = active.reshape(B, T, G, H // G).any(-1)  # [B, T, G]
    n_real = int(real.sum())
    kv_reads = int(group_on.sum())
    kv_keys_all = int((n_keys * real).sum()) * G
    kv_keys_read = int((n_keys * group_on.sum(-1)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    n_active = int(active.sum())
    return dict(dense_flops=dense, routed_flops=routed, flops_ratio=ratio(routed, dense),
                n_pairs=n_real * H, n_active=n_active, active_fraction=ratio(n_active, n_real * H),
                kv_pairs=n_real * G, kv_reads=kv_reads, kv_read_fraction=ratio(kv_reads, n_real * G),
                kv_read_key_fraction=ratio(kv_keys_read, kv_keys_all))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
