"""Gated linear attention (GLA) in pure torch: the spec of the Triton kernel and the CPU path.

State S `[F, D]`, per-step per-feature log decay g_t `[F]` (<= 0):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t.

Forms: `gla_recurrent` (a python loop over time steps carrying S, the recurrence above written out
line for line), `gla_parallel` (through the `[T, T]` pattern, O(T²) memory), `gla_chunked` (the
`[chunk, chunk]` form inside a chunk with decays cumulated from the chunk's start, S carried across
chunks; peak memory B·H·chunk²·F floats) and `gla_pattern` (the implicit attention pattern P with
o = P @ v).

The naive spec: `gla_recurrent` already is the plain step-by-step loop over the state (batched over
B and H, nothing else), in the spirit of flash-linear-attention's `naive.py`; it is the definition
the other forms and the Triton kernel are checked against, so no separate `gla_naive` duplicates it.

Inputs: q, k, g `[B, H, T, F]`, v `[B, H, T, D]`, any float dtype; the math is float32 and every
output is float32 `[B, H, T, D]`.
"""

from __future__ import annotations

import torch

from .common import _causal, _pad_keys, check_chunk, check_g, check_qkv, check_state, f32, row_index

__all__ = ["gla_recurrent", "gla_parallel", "gla_chunked", "gla_pattern"]


def _gla_init(initial_state, B, H, F, D):
    if isinstance(initial_state, (tuple, list)):  # accept (S,) or (S, None) for symmetry with linear
        initial_state = initial_state[0]
    return check_state(initial_state, (B, H, F, D), "initial_state S")


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                  initial_state: torch.Tensor | None = None, return_state: bool = False):
    """Gated linear attention by its definition: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        v: `[B, H, T, D]`.
        g: `[B, H, T, F]`, per-step per-feature log decay (<= 0; larger values are allowed but then
            states grow without bound).
        initial_state: optional S0 `[B, H, F, D]`.
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, F, D]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_g(g, q)
    q, k, v, g = q.to(f32), k.to(f32), v.to(f32), g.to(f32)
    S0 = _gla_init(initial_state, B, H, F, D)
    S = torch.zeros(B, H, F, D, dtype=f32, device=q.device) if S0 is None else S0
    outs = []
    for t in range(T):
        S = torch.exp(g[:, :, t, :, None]) * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhf,bhfd->bhd", q[:, :, t], S))
    o = torch.stack(outs, 2) if T else v.new_zeros(B, H, 0, D)
    return (o, S) if return_state else o


def gla_pattern(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, *, rows: slice | None = None,
                block: int = 64) -> torch.Tensor:
    """The implicit attention pattern of GLA: P_ij = Σ_f q_if k_jf exp(G_if - G_jf) for j <= i, G = cumsum(g).

    Computed `block` query rows at a time. With m the first row of a block, the keys before m go
    through one matmul, exp(G_i - G_j) = exp(G_i - G_m) · exp(G_m - G_j), both factors in [0, 1]
    (i >= m > j, g <= 0); the keys from m on (the block's own triangle) through the explicit
    `[rows, keys, F]` decay product. Peak memory is B·H·block·(T + block·F) floats.

    Numerics: G is summed and differenced in float64 and only differences are exponentiated, in
    float32, so nothing overflows whatever T·|g| when g <= 0; a factor below ~1e-38 (Σ g < -87)
    underflows to 0, and the true entry is then smaller still. Entries above the diagonal are
    masked before exp(), so gradients stay finite.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        g: `[B, H, T, F]`.
        rows: optional slice of query rows (only they are computed).
        block: query rows per step.

    Returns:
        float32 `[B, H, n_rows, T]`, zero above the diagonal.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, F] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}")
    check_g(g, q)
    T = q.shape[2]
    idx, hi = row_index(rows, T)
    if idx is None:
        idx = torch.arange(T)
    idx = idx.to(q.device)
    G = torch.cumsum(g.to(torch.float64), 2)  # [B, H, T, F]
    qf, kf = q.to(f32), k.to(f32)
    parts = []
    for r0 in range(0, idx.numel(), block):
        ri = idx[r0:r0 + block]
        m, top = int(ri.min()), int(ri.max()) + 1
        Gi = G[:, :, ri]  # [B, H, n, F]
        # keys j < m: a matmul of two bounded factors
        far = (qf[:, :, ri] * torch.exp((Gi - G[:, :, m:m + 1]).to(f32))) @ \
            (kf[:, :, :m] * torch.exp((G[:, :, m:m + 1] - G[:, :, :m]).to(f32))).transpose(-1, -2)  # [B, H, n, m]
        # keys m <= j < top: the explicit decay product, masked before exp()
        vis = _causal(ri, ri.numel(), top, q.device)[:, m:]  # [n, top - m]
        diff = (Gi[:, :, :, None, :] - G[:, :, None, m:top, :]).to(f32)  # [B, H, n, top - m, F]
        decay = torch.exp(torch.where(vis[:, :, None], diff, torch.full_like(diff, float("-inf"))))
        near = torch.einsum("bhif,bhjf,bhijf->bhij", qf[:, :, ri], kf[:, :, m:top], decay)
        parts.append(_pad_keys(torch.cat([far, near], -1), T))
    if not parts:
        return q.new_zeros(q.shape[0], q.shape[1], 0, T, dtype=f32)
    return torch.cat(parts, 2)


def gla_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                 initial_state: torch.Tensor | None = None, return_state: bool = False):
    """GLA through its `[T, T]` pattern (`gla_pattern`: O(T²·F) work, O(T²) memory for the pattern).

    o = P v (+ (q ⊙ exp(G)) S0 with an initial state); numerical range as in `gla_pattern` (no overflow for any
    T when g <= 0).

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        v: `[B, H, T, D]`.
        g: `[B, H, T, F]`, per-step per-feature log decay (<= 0).
        initial_state: optional S0 `[B, H, F, D]`.
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, F, D]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_g(g, q)
    S0 = _gla_init(initial_state, B, H, F, D)
    v32 = v.to(f32)
    o = gla_pattern(q, k, g) @ v32
    G = torch.cumsum(g.to(torch.float64), 2)  # [B, H, T, F]
    if S0 is not None:
        o = o + (q.to(f32) * torch.exp(G.to(f32))) @ S0
    if not return_state:
        return o
    if T == 0:
        S = torch.zeros(B, H, F, D, dtype=f32, device=q.device) if S0 is None else S0
        return o, S
    GT = G[:, :, -1:]  # [B, H, 1, F]
    S = (k.to(f32) * torch.exp((GT - G).to(f32))).transpose(-1, -2) @ v32
    if S0 is not None:
        S = S + torch.exp(GT[:, :, 0, :, None].to(f32)) * S0
    return o, S


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, chunk: int = 64,
                initial_state: torch.Tensor | None = None, return_state: bool = False):
    """GLA chunk by chunk, with log decays cumulated from each chunk's start (no secondary chunking).

    With b the inclusive cumsum of g inside the chunk (|b| <= chunk·max|g|, whatever T):
        o_i = (q_i ⊙ exp(b_i)) S_prev + Σ_{j<=i in chunk} [Σ_f q_if k_jf exp(b_if - b_jf)] v_j,
        S_next = diag(exp(b_last)) S_prev + Σ_j (k_j ⊙ exp(b_last - b_j)) v_jᵀ.
    Every exponent is <= 0 when g <= 0, so nothing overflows; the intra-chunk scores go through the
    explicit `[chunk, chunk, F]` decay product (peak memory B·H·chunk²·F floats).

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        v: `[B, H, T, D]`.
        g: `[B, H, T, F]`, per-step per-feature log decay (<= 0).
        chunk: rows per chunk (the last chunk may be shorter).
        initial_state: optional S0 `[B, H, F, D]`.
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, F, D]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_g(g, q)
    check_chunk(chunk)
    q, k, v, g = q.to(f32), k.to(f32), v.to(f32), g.to(f32)
    S0 = _gla_init(initial_state, B, H, F, D)
    S = torch.zeros(B, H, F, D, dtype=f32, device=q.device) if S0 is None else S0
    outs = []
    for c0 in range(0, T, chunk):
        qc, kc, vc = q[:, :, c0:c0 + chunk], k[:, :, c0:c0 + chunk], v[:, :, c0:c0 + chunk]
        n = qc.shape[2]
        b = torch.cumsum(g[:, :, c0:c0 + chunk], 2)  # [B, H, n, F]
        vis = _causal(None, n, n, q.device)
        diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [B, H, n, n, F]
        decay = torch.exp(torch.where(vis[:, :, None], diff, torch.full_like(diff, float("-inf"))))
        A = torch.einsum("bhif,bhjf,bhijf->bhij", qc, kc, decay)
        outs.append((qc * torch.exp(b)) @ S + A @ vc)
        blast = b[:, :, -1:]  # [B, H, 1, F]
        S = torch.exp(blast[:, :, 0, :, None]) * S + (kc * torch.exp(blast - b)).transpose(-1, -2) @ vc
    o = torch.cat(outs, 2) if T else v.new_zeros(B, H, 0, D)
    return (o, S) if return_state else o
