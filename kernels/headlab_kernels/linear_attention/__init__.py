"""Causal linear attention: linear (kernel) attention, gated linear attention (GLA) and the delta rule.

`linear_attention`, `gla_attention` and `delta_attention` dispatch between the Triton chunked
forward kernels of `kernels.linear_attention.triton` (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1) and the torch chunked forms of `kernels.linear_attention.reference`, which also
holds the recurrent (definition) and parallel (`[T, T]`) forms and the implicit attention patterns
(`*_pattern`: the `[B, H, T, T]` matrix P with o = P @ v). `reference` only re-exports: each rule's
forms live in their own module, `linear`, `gla` and `delta`.

Inputs: q, k `[B, H, T, F]`, already feature-mapped and scaled by the caller; v `[B, H, T, D]`;
any float dtype, float32 math, float32 outputs `[B, H, T, D]`. Everything is causal.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from .common import check_beta, check_g, check_qkv
from .reference import (delta_chunked, delta_parallel, delta_pattern, delta_recurrent, gla_chunked, gla_parallel,
                        gla_pattern, gla_recurrent, linear_chunked, linear_parallel, linear_pattern,
                        linear_recurrent)

__all__ = [
    "linear_attention", "gla_attention", "delta_attention",
    "linear_recurrent", "linear_parallel", "linear_chunked", "linear_pattern",
    "gla_recurrent", "gla_parallel", "gla_chunked", "gla_pattern",
    "delta_recurrent", "delta_parallel", "delta_chunked", "delta_pattern",
]

Impl = Literal["auto", "triton", "torch", "reference"]
_IMPLS = ("auto", "triton", "torch", "reference")  # "reference" is an alias of "torch", as in kernels.head_stats
_MAX_TRITON_F = 128  # the kernels keep the [F, D-block] state in registers


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True,
                     eps: float = 1e-6, impl: Impl = "auto", chunk: int | None = None) -> torch.Tensor:
    """Causal linear attention: o_t = q_tᵀ S_t / (q_t·z_t + eps), S_t = Σ_{j<=t} k_j v_jᵀ, z_t = Σ_{j<=t} k_j.

    Args:
        q: `[B, H, T, F]`, feature-mapped (with normalize=True, keep q·k > 0).
        k: `[B, H, T, F]`, feature-mapped.
        v: `[B, H, T, D]`.
        normalize: divide by q_t·z_t + eps (False: o_t = q_tᵀ S_t).
        eps: added to the normaliser.
        impl: "auto" (Triton on CUDA tensors when triton imports and F <= 128, torch chunked elsewhere),
            "triton" (on CPU tensors it needs TRITON_INTERPRET=1 set before triton is first imported) or
            "torch" (the chunked reference; "reference" is accepted too).
        chunk: rows per chunk (default 64).

    Returns:
        float32 `[B, H, T, D]`; differentiable either way (the Triton path's backward is the torch
        chunked reference's).

    Raises:
        ValueError: inputs that are not `[B, H, T, F]` / `[B, H, T, D]` tensors of matching sizes, or an unknown impl.
        RuntimeError: impl="triton" without the triton package, or on CPU tensors without TRITON_INTERPRET=1.
    """
    check_qkv(q, k, v)
    if _resolve(impl, q) == "torch":
        return linear_chunked(q, k, v, normalize=normalize, eps=eps, chunk=chunk or 64)
    from .triton import linear_chunked_triton

    return linear_chunked_triton(q, k, v, normalize=normalize, eps=eps, chunk=chunk or 64)


def gla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, impl: Impl = "auto",
                  chunk: int | None = None) -> torch.Tensor:
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t (no normaliser).

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        v: `[B, H, T, D]`.
        g: `[B, H, T, F]`, log decays (<= 0), e.g. logsigmoid of a gate.
        impl: as in `linear_attention`.
        chunk: rows per chunk (default 32 for Triton, 64 for torch).

    Returns:
        float32 `[B, H, T, D]`.

    Raises:
        ValueError: inputs of the wrong shapes (g must match q), or an unknown impl.
        RuntimeError: impl="triton" without the triton package, or on CPU tensors without TRITON_INTERPRET=1.
    """
    check_qkv(q, k, v)
    check_g(g, q)
    if _resolve(impl, q) == "torch":
        return gla_chunked(q, k, v, g, chunk=chunk or 64)
    from .triton import gla_chunked_triton

    return gla_chunked_triton(q, k, v, g, chunk=chunk or 32)


def delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                    impl: Impl = "auto", chunk: int = 64) -> torch.Tensor:
    """The delta rule (DeltaNet): S_t = S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]` (normally L2-normalised by the caller).
        v: `[B, H, T, D]`.
        beta: `[B, H, T]`, write strengths in (0, 1).
        impl: "auto" or "torch" (the chunked WY form); there is no Triton delta-rule kernel, so
            "triton" raises.
        chunk: rows per chunk.

    Returns:
        float32 `[B, H, T, D]`.

    Raises:
        ValueError: inputs of the wrong shapes (beta `[B, H, T]`), or an unknown impl.
        NotImplementedError: impl="triton" (there is no Triton delta-rule kernel).
    """
    check_qkv(q, k, v)
    check_beta(beta, q)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch' ('reference'); got {impl!r}")
    if impl == "triton":
        raise NotImplementedError("there is no Triton delta-rule kernel; use impl='torch' (or 'auto'), "
                                  "the chunked WY form in torch")
    return delta_chunked(q, k, v, beta, chunk=chunk)


def _resolve(impl: str, q: torch.Tensor) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch' ('reference'); got {impl!r}")
    if impl == "reference":
        return "torch"
    if impl == "auto":
        return "triton" if q.is_cuda and q.shape[-1] <= _MAX_TRITON_F and _triton_available() else "torch"
    if impl == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    if impl == "triton" and not _triton_available():
        raise RuntimeError("impl='triton' needs the triton package (the 'kernels' extra); use impl='torch'")
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
