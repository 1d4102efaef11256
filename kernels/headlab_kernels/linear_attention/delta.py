"""The delta rule (DeltaNet) in pure torch: the spec and the CPU path (there is no Triton kernel).

State S `[D, F]` (it maps keys to values), write strength beta_t in (0, 1):
    S_t = S_{t-1} (I - beta_t k_t k_tᵀ) + beta_t v_t k_tᵀ,   o_t = S_t q_t.

Forms: `delta_recurrent` (a python loop over time steps carrying S), `delta_parallel` (the WY /
triangular form over the whole sequence, O(T²) memory, one triangular solve), `delta_chunked` (the
WY form inside each chunk, S carried across chunks) and `delta_pattern` (the implicit attention
pattern P with o = P @ v).

The naive spec: `delta_recurrent` already is the plain step-by-step loop over the state (batched
over B and H, nothing else), in the spirit of flash-linear-attention's `naive.py`. It writes each
step as S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_tᵀ, the same update with the product
S (I - beta k kᵀ) expanded (v_t - S_{t-1} k_t is what the memory gets wrong about v_t); it is the
definition the other forms are checked against, so no separate `delta_naive` duplicates it.

Inputs: q, k `[B, H, T, F]` (k normally L2-normalised by the caller), v `[B, H, T, D]`, beta
`[B, H, T]`, any float dtype; the math is float32 and every output is float32 `[B, H, T, D]`.
"""

from __future__ import annotations

import torch

from .common import _causal, _pad_keys, check_beta, check_chunk, check_qkv, check_state, f32, row_index

__all__ = ["delta_recurrent", "delta_parallel", "delta_chunked", "delta_pattern"]


def _delta_init(initial_state, B, H, F, D):
    if isinstance(initial_state, (tuple, list)):
        initial_state = initial_state[0]
    return check_state(initial_state, (B, H, D, F), "initial_state S (delta rule: [B, H, D, F])")


def delta_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                    initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The delta rule by its definition: S_t = S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]` (normally L2-normalised by the caller, so the update is a contraction).
        v: `[B, H, T, D]`.
        beta: `[B, H, T]`, write strengths in (0, 1).
        initial_state: optional S0 `[B, H, D, F]` (note: values × keys).
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, D, F]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_beta(beta, q)
    q, k, v, beta = q.to(f32), k.to(f32), v.to(f32), beta.to(f32)
    S0 = _delta_init(initial_state, B, H, F, D)
    S = torch.zeros(B, H, D, F, dtype=f32, device=q.device) if S0 is None else S0
    outs = []
    for t in range(T):
        kt = k[:, :, t]
        err = v[:, :, t] - torch.einsum("bhdf,bhf->bhd", S, kt)  # what the memory gets wrong about v_t
        S = S + beta[:, :, t, None, None] * err[..., :, None] * kt[..., None, :]
        outs.append(torch.einsum("bhdf,bhf->bhd", S, q[:, :, t]))
    o = torch.stack(outs, 2) if T else v.new_zeros(B, H, 0, D)
    return (o, S) if return_state else o


def _delta_block(qc, kc, vc, bc, S):
    """One block of the delta rule from state S `[B, H, D, F]` (None = 0): (o `[B, H, n, D]`, S_next).

    With the block's keys K, L = I + strict_tril(diag(β) K Kᵀ) and U = L⁻¹ diag(β) (V - K Sᵀ):
    O = Q Sᵀ + tril(Q Kᵀ) U and S_next = S + Uᵀ K (the WY form of the n rank-one updates).
    """
    n = qc.shape[2]
    L = torch.tril(bc[..., :, None] * (kc @ kc.transpose(-1, -2)), -1)
    L = L + torch.eye(n, dtype=f32, device=qc.device)
    rhs = vc if S is None else vc - kc @ S.transpose(-1, -2)
    U = torch.linalg.solve_triangular(L, bc[..., :, None] * rhs, upper=False, unitriangular=True)  # [B, H, n, D]
    A = (qc @ kc.transpose(-1, -2)).masked_fill(~_causal(None, n, n, qc.device), 0.0)
    o = A @ U
    if S is not None:
        o = o + qc @ S.transpose(-1, -2)
    dS = U.transpose(-1, -2) @ kc  # [B, H, D, F]
    return o, (dS if S is None else S + dS)


def delta_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                   initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The delta rule through the WY / triangular form over the whole sequence (O(T²) memory, one solve).

    U = (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β) V (torch.linalg.solve_triangular), O = tril(Q Kᵀ) U.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]` (normally L2-normalised by the caller, so the update is a contraction).
        v: `[B, H, T, D]`.
        beta: `[B, H, T]`, write strengths in (0, 1).
        initial_state: optional S0 `[B, H, D, F]` (note: values × keys).
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, D, F]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_beta(beta, q)
    S0 = _delta_init(initial_state, B, H, F, D)
    o, S = _delta_block(q.to(f32), k.to(f32), v.to(f32), beta.to(f32), S0)
    if not return_state:
        return o
    return o, S


def delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, chunk: int = 64,
                  initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The delta rule chunk by chunk: the WY form inside each chunk, the state `[D, F]` across chunks.

    For a chunk with keys K, queries Q, values V, strengths β and incoming state S:
    U = (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β) (V - K Sᵀ), O = Q Sᵀ + tril(Q Kᵀ) U, S ← S + Uᵀ K.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]` (normally L2-normalised by the caller, so the update is a contraction).
        v: `[B, H, T, D]`.
        beta: `[B, H, T]`, write strengths in (0, 1).
        chunk: rows per chunk (the last chunk may be shorter).
        initial_state: optional S0 `[B, H, D, F]` (note: values × keys).
        return_state: also return S_T.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, D, F]`).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_beta(beta, q)
    check_chunk(chunk)
    q, k, v, beta = q.to(f32), k.to(f32), v.to(f32), beta.to(f32)
    S = _delta_init(initial_state, B, H, F, D)
    outs = []
    for c0 in range(0, T, chunk):
        sl = slice(c0, c0 + chunk)
        o, S = _delta_block(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], S)
        outs.append(o)
    o = torch.cat(outs, 2) if T else v.new_zeros(B, H, 0, D)
    if not return_state:
        return o
    return o, (torch.zeros(B, H, D, F, dtype=f32, device=q.device) if S is None else S)


def delta_pattern(q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, *, rows: slice | None = None) -> torch.Tensor:
    """The implicit attention pattern of the delta rule: M = tril(Q Kᵀ) (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β).

    O = M V exactly (no initial state). Row i of M depends on the first i + 1 keys only, so with
    `rows` the triangular solve runs on the leading `hi × hi` block (hi = last selected row + 1);
    that solve is `[hi, hi]` whatever the number of rows.

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        beta: `[B, H, T]`.
        rows: optional slice of query rows.

    Returns:
        float32 `[B, H, n_rows, T]`, zero above the diagonal.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, F] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}")
    check_beta(beta, q)
    T = q.shape[2]
    idx, hi = row_index(rows, T)
    kf, bf = k.to(f32)[:, :, :hi], beta.to(f32)[:, :, :hi]
    qr = q.to(f32) if idx is None else q.to(f32)[:, :, idx.to(q.device)]
    L = torch.tril(bf[..., :, None] * (kf @ kf.transpose(-1, -2)), -1) + torch.eye(hi, dtype=f32, device=q.device)
    X = torch.linalg.solve_triangular(L, torch.diag_embed(bf), upper=False, unitriangular=True)  # [B, H, hi, hi]
    A = (qr @ kf.transpose(-1, -2)).masked_fill(~_causal(idx, qr.shape[2], hi, q.device), 0.0)
    return _pad_keys(A @ X, T)
