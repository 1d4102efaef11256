"""Triton chunked causal forward kernels for linear attention and gated linear attention (GLA).

One program per (batch·head, value block) walks the chunks of its sequence in order, holding the
state S `[F, D-block]` (and the linear form's normaliser z `[F]`) in registers, in float32:
- linear: A = tril(q kᵀ) inside the chunk (tl.dot), o = q S + A v (tl.dot), divided by
  q·z + rowsum(A) + eps when normalize; then S += kᵀ v, z += Σ k.
- GLA: b = cumsum(g) inside the chunk (relative to its start, so bounded by chunk·max|g|);
  o = (q ⊙ exp(b)) S + A v and S ← diag(exp(b_last)) S + (k ⊙ exp(b_last - b))ᵀ v (tl.dot), every
  exponent <= 0 when g <= 0. The intra-chunk scores A_ij = Σ_f q_if k_jf exp(b_if - b_jf) are a
  broadcast-multiply-reduce over `[chunk, chunk, 16]` feature slices, not a tl.dot: factoring
  exp(b_i - b_j) = exp(b_i)·exp(-b_j) would overflow float32 once chunk·|g| passes ~88 (the reason
  other implementations add a secondary chunking); the explicit product is exact for any g <= 0.
Every load is cast to float32 and the dots use input_precision "ieee" by default ("tf32" is faster
on GPUs and looser). Arbitrary T (masked tail chunk), F <= 128 and any D (value blocks of up to 64,
padded to powers of two >= 16 with masks). Outputs are contiguous float32 `[B, H, T, D]`.

The autograd wrappers' backward is NOT a Triton kernel: it recomputes the forward through the torch
chunked reference (`linear_chunked` / `gla_chunked`) and differentiates that, so training works
and its gradients are the reference's (at the reference's speed and memory).

Note: tuned for nothing yet (written and tested under the CPU interpreter only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_g, check_qkv
from .gla import gla_chunked
from .linear import linear_chunked

MAX_F = 128


@triton.jit
def _linear_fwd_kernel(Q, K, V, O, sq_b, sq_h, sq_t, sq_f, sk_b, sk_h, sk_t, sk_f, sv_b, sv_h, sv_t, sv_d,
                       H, T, F, D, eps, NORMALIZE: tl.constexpr, C: tl.constexpr, BF: tl.constexpr,
                       BD: tl.constexpr, PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit base offsets: B·H·T·F can pass 2^31
    h = (pid_bh % H).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    fm = offs_f < F
    dm = offs_d < D
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    o_base = O + pid_bh.to(tl.int64) * T * D
    causal = offs_c[:, None] >= offs_c[None, :]  # [C, C]
    S = tl.zeros([BF, BD], tl.float32)
    z = tl.zeros([BF], tl.float32)
    for c0 in range(0, T, C):
        rows = (c0 + offs_c).to(tl.int64)
        rm = rows < T
        q = tl.load(q_base + rows[:, None] * sq_t + offs_f[None, :] * sq_f, mask=rm[:, None] & fm[None, :],
                    other=0.0).to(tl.float32)  # [C, BF]
        k = tl.load(k_base + rows[:, None] * sk_t + offs_f[None, :] * sk_f, mask=rm[:, None] & fm[None, :],
                    other=0.0).to(tl.float32)  # [C, BF]
        v = tl.load(v_base + rows[:, None] * sv_t + offs_d[None, :] * sv_d, mask=rm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)  # [C, BD]
        A = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)  # [C, C]
        o = tl.dot(q, S, input_precision=PRECISION) + tl.dot(A, v, input_precision=PRECISION)  # [C, BD]
        if NORMALIZE:
            den = tl.sum(q * z[None, :], 1) + tl.sum(A, 1) + eps  # [C]
            o = o / den[:, None]
        tl.store(o_base + rows[:, None] * D + offs_d[None, :], o, mask=rm[:, None] & dm[None, :])
        S += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        z += tl.sum(k, 0)


@triton.jit
def _gla_fwd_kernel(Q, K, V, G, O, sq_b, sq_h, sq_t, sq_f, sk_b, sk_h, sk_t, sk_f, sv_b, sv_h, sv_t, sv_d,
                    sg_b, sg_h, sg_t, sg_f, H, T, F, D, C: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
                    FS: tl.constexpr, PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BF)
    offs_d = pid_d * BD + tl.arange(0, BD)
    fm = offs_f < F
    dm = offs_d < D
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    g_base = G + b * sg_b + h * sg_h
    o_base = O + pid_bh.to(tl.int64) * T * D
    causal = offs_c[:, None] >= offs_c[None, :]  # [C, C]
    last = offs_c[:, None] == C - 1  # [C, 1]
    S = tl.zeros([BF, BD], tl.float32)
    for c0 in range(0, T, C):
        rows = (c0 + offs_c).to(tl.int64)
        rm = rows < T
        # intra-chunk scores, 16 features at a time: Σ_f q_if k_jf exp(b_if - b_jf), exponent <= 0
        A = tl.zeros([C, C], tl.float32)
        for f0 in tl.static_range(0, BF, FS):
            offs_s = f0 + tl.arange(0, FS)
            msk = rm[:, None] & (offs_s[None, :] < F)
            qs = tl.load(q_base + rows[:, None] * sq_t + offs_s[None, :] * sq_f, mask=msk, other=0.0).to(tl.float32)
            ks = tl.load(k_base + rows[:, None] * sk_t + offs_s[None, :] * sk_f, mask=msk, other=0.0).to(tl.float32)
            gs = tl.load(g_base + rows[:, None] * sg_t + offs_s[None, :] * sg_f, mask=msk, other=0.0).to(tl.float32)
            bs = tl.cumsum(gs, 0)  # [C, FS]
            diff = tl.where(causal[:, :, None], bs[:, None, :] - bs[None, :, :], float("-inf"))  # [C, C, FS]
            A += tl.sum(qs[:, None, :] * ks[None, :, :] * tl.exp(diff), 2)
        msk = rm[:, None] & fm[None, :]
        q = tl.load(q_base + rows[:, None] * sq_t + offs_f[None, :] * sq_f, mask=msk, other=0.0).to(tl.float32)
        k = tl.load(k_base + rows[:, None] * sk_t + offs_f[None, :] * sk_f, mask=msk, other=0.0).to(tl.float32)
        g = tl.load(g_base + rows[:, None] * sg_t + offs_f[None, :] * sg_f, mask=msk, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * sv_t + offs_d[None, :] * sv_d, mask=rm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)  # [C, BD]
        bc = tl.cumsum(g, 0)  # [C, BF]; padded rows add 0, so row C-1 holds the last real row's sum
        b_last = tl.sum(tl.where(last, bc, 0.0), 0)  # [BF]
        o = tl.dot(q * tl.exp(bc), S, input_precision=PRECISION) + tl.dot(A, v, input_precision=PRECISION)
        tl.store(o_base + rows[:, None] * D + offs_d[None, :], o, mask=rm[:, None] & dm[None, :])
        ke = k * tl.exp(b_last[None, :] - bc)  # [C, BF]
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(ke), v, input_precision=PRECISION)


def _check_chunk(chunk: int) -> int:
    if not isinstance(chunk, int) or chunk < 16 or chunk > 128 or chunk & (chunk - 1):
        raise ValueError(f"the Triton kernels need chunk to be a power of two in [16, 128]; got {chunk!r}")
    return chunk


def _launch_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_d: int):
    B, H, T, F, D = check_qkv(q, k, v)
    if F > MAX_F:
        raise ValueError(f"the Triton kernels keep the state in registers and take F <= {MAX_F}; got F={F} "
                         f"(use impl='torch')")
    bf = max(16, triton.next_power_of_2(F))
    bd = max(16, min(block_d, triton.next_power_of_2(max(D, 1))))
    o = torch.empty(B, H, T, D, dtype=torch.float32, device=q.device)
    strides = [*q.stride(), *k.stride(), *v.stride()]
    return (B, H, T, F, D), bf, bd, o, strides


def _linear_forward(q, k, v, normalize, eps, chunk, block_d, precision):
    (B, H, T, F, D), bf, bd, o, strides = _launch_common(q, k, v, block_d)
    if B * H * T * D == 0:
        return o.zero_()
    _linear_fwd_kernel[(B * H, triton.cdiv(D, bd))](
        q, k, v, o, *strides, H, T, F, D, float(eps), NORMALIZE=bool(normalize), C=chunk, BF=bf, BD=bd,
        PRECISION=precision)
    return o


def _gla_forward(q, k, v, g, chunk, block_d, precision):
    (B, H, T, F, D), bf, bd, o, strides = _launch_common(q, k, v, block_d)
    if B * H * T * D == 0:
        return o.zero_()
    _gla_fwd_kernel[(B * H, triton.cdiv(D, bd))](
        q, k, v, g, o, *strides, *g.stride(), H, T, F, D, C=chunk, BF=bf, BD=bd, FS=16, PRECISION=precision)
    return o


class _LinearChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, normalize, eps, chunk, block_d, precision):
        ctx.save_for_backward(q, k, v)
        ctx.args = (normalize, eps)
        return _linear_forward(q, k, v, normalize, eps, chunk, block_d, precision)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        normalize, eps = ctx.args
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(True) for x in (q, k, v)]
            o = linear_chunked(*xs, normalize=normalize, eps=eps)
            grads = torch.autograd.grad(o, xs, do, allow_unused=True)
        return (*grads, None, None, None, None, None)


class _GLAChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, chunk, block_d, precision):
        ctx.save_for_backward(q, k, v, g)
        return _gla_forward(q, k, v, g, chunk, block_d, precision)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g = ctx.saved_tensors
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(True) for x in (q, k, v, g)]
            o = gla_chunked(*xs)
            grads = torch.autograd.grad(o, xs, do, allow_unused=True)
        return (*grads, None, None, None)


def linear_chunked_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True,
                          eps: float = 1e-6, chunk: int = 64, block_d: int = 64,
                          precision: str = "ieee") -> torch.Tensor:
    """Causal linear attention, Triton chunked forward; the math of `reference.linear_chunked`.

    Parameters
    ----------
    q, k : `[B, H, T, F]` (F <= 128), any strides, any float dtype (loaded as float32).
    v : `[B, H, T, D]`.
    normalize, eps : as in `linear_recurrent`.
    chunk : rows per chunk, a power of two in [16, 128].
    block_d : value columns per program (a power of two; D is split across programs).
    precision : tl.dot input precision, "ieee" (exact float32) or "tf32".

    Returns
    -------
    float32 `[B, H, T, D]`. Differentiable: the backward recomputes through the torch chunked
    reference (it is the reference's gradient, not a Triton kernel).
    """
    check_qkv(q, k, v)
    _check_chunk(chunk)
    return _LinearChunked.apply(q, k, v, bool(normalize), float(eps), chunk, block_d, precision)


def gla_chunked_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, chunk: int = 32,
                       block_d: int = 64, precision: str = "ieee") -> torch.Tensor:
    """Gated linear attention, Triton chunked forward; the math of `reference.gla_chunked`.

    Parameters
    ----------
    q, k, g : `[B, H, T, F]` (F <= 128; g the log decays, <= 0), any strides and float dtypes.
    v : `[B, H, T, D]`.
    chunk : rows per chunk, a power of two in [16, 128] (the intra-chunk product is
        `[chunk, chunk, 16]` per feature slice, so keep it small: 16 or 32).
    block_d, precision : as in `linear_chunked_triton`.

    Returns
    -------
    float32 `[B, H, T, D]`. Differentiable through the torch chunked reference's backward.
    """
    check_qkv(q, k, v)
    check_g(g, q)
    _check_chunk(chunk)
    return _GLAChunked.apply(q, k, v, g, chunk, block_d, precision)
