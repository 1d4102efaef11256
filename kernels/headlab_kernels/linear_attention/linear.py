"""Causal linear (kernel) attention in pure torch: the spec of the Triton kernel and the CPU path.

State S `[F, D]` and normaliser z `[F]`:
    S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t,
    o_t = (q_tᵀ S_t) / (q_t · z_t + eps)   (normalize=True),   o_t = q_tᵀ S_t   (normalize=False).

Forms: `linear_recurrent` (a python loop over time steps carrying (S, z), the recurrence above
written out line for line), `linear_parallel` (the `[T, T]` matrix tril(q kᵀ) applied to v, O(T²)
memory), `linear_chunked` (tril(q kᵀ) inside a chunk, (S, z) carried across chunks; O(T·chunk)
memory) and `linear_pattern` (the implicit attention pattern P with o = P @ v).

The naive spec: `linear_recurrent` already is the plain step-by-step loop over the state (batched
over B and H, nothing else), in the spirit of flash-linear-attention's `naive.py`; it is the
definition the other forms and the Triton kernel are checked against, so no separate
`linear_naive` duplicates it.

Inputs: q, k `[B, H, T, F]` already feature-mapped (and scaled) by the caller, v `[B, H, T, D]`,
any float dtype; the math is float32 and every output is float32 `[B, H, T, D]`.
"""

from __future__ import annotations

import torch

from .common import _causal, _pad_keys, check_chunk, check_qkv, check_state, f32, row_index

__all__ = ["linear_recurrent", "linear_parallel", "linear_chunked", "linear_pattern"]


def _linear_init(initial_state, B, H, F, D, device):
    if initial_state is None:
        return None, None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise ValueError("initial_state of linear attention must be a pair (S [B, H, F, D], z [B, H, F] or None)")
    S0 = check_state(initial_state[0], (B, H, F, D), "initial_state S")
    z0 = check_state(initial_state[1], (B, H, F), "initial_state z")
    if S0 is None:
        S0 = torch.zeros(B, H, F, D, dtype=f32, device=device)
    return S0, z0


def linear_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                     initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                     return_state: bool = False):
    """Causal linear attention by its definition, one step at a time (the spec; O(T) python steps).

    Args:
        q: `[B, H, T, F]`, feature-mapped (for normalize=True keep q·k > 0, e.g. elu+1 features).
        k: `[B, H, T, F]`, feature-mapped.
        v: `[B, H, T, D]`.
        normalize: divide q_tᵀ S_t by q_t · z_t + eps.
        eps: added to the normaliser.
        initial_state: optional (S0 `[B, H, F, D]`, z0 `[B, H, F]` or None), the state before step 0.
        return_state: also return the final state.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, (S_T `[B, H, F, D]`, z_T `[B, H, F]`)).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    q, k, v = q.to(f32), k.to(f32), v.to(f32)
    S0, z0 = _linear_init(initial_state, B, H, F, D, q.device)
    S = torch.zeros(B, H, F, D, dtype=f32, device=q.device) if S0 is None else S0
    z = torch.zeros(B, H, F, dtype=f32, device=q.device) if z0 is None else z0
    outs = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        qt = q[:, :, t]
        o = torch.einsum("bhf,bhfd->bhd", qt, S)
        if normalize:
            o = o / ((qt * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    o = torch.stack(outs, 2) if T else v.new_zeros(B, H, 0, D)
    return (o, (S, z)) if return_state else o


def linear_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                    return_state: bool = False):
    """Causal linear attention through the materialised `[T, T]` matrix A = tril(q kᵀ) (O(T²) memory).

    o = A v / (rowsum(A) + eps) when normalize, else A v (an initial state adds q S0 and q·z0).

    Args:
        q: `[B, H, T, F]`, feature-mapped (for normalize=True keep q·k > 0, e.g. elu+1 features).
        k: `[B, H, T, F]`, feature-mapped.
        v: `[B, H, T, D]`.
        normalize: divide q_tᵀ S_t by q_t · z_t + eps.
        eps: added to the normaliser.
        initial_state: optional (S0 `[B, H, F, D]`, z0 `[B, H, F]` or None), the state before step 0.
        return_state: also return the final state.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, (S_T `[B, H, F, D]`, z_T `[B, H, F]`)).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    q, k, v = q.to(f32), k.to(f32), v.to(f32)
    S0, z0 = _linear_init(initial_state, B, H, F, D, q.device)
    A = (q @ k.transpose(-1, -2)).masked_fill(~_causal(None, T, T, q.device), 0.0)  # [B, H, T, T]
    o = A @ v
    if S0 is not None:
        o = o + q @ S0
    if normalize:
        den = A.sum(-1, keepdim=True) + eps
        if z0 is not None:
            den = den + (q * z0[:, :, None]).sum(-1, keepdim=True)
        o = o / den
    if not return_state:
        return o
    S = k.transpose(-1, -2) @ v + (0 if S0 is None else S0)
    z = k.sum(2) + (0 if z0 is None else z0)
    return o, (S, z)


def linear_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                   chunk: int = 64, initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                   return_state: bool = False):
    """Causal linear attention chunk by chunk: tril(q kᵀ) inside a chunk, the state (S, z) across chunks.

    O(T·chunk) memory.

    Args:
        q: `[B, H, T, F]`, feature-mapped (for normalize=True keep q·k > 0, e.g. elu+1 features).
        k: `[B, H, T, F]`, feature-mapped.
        v: `[B, H, T, D]`.
        normalize: divide q_tᵀ S_t by q_t · z_t + eps.
        eps: added to the normaliser.
        chunk: rows per chunk (the last chunk may be shorter).
        initial_state: optional (S0 `[B, H, F, D]`, z0 `[B, H, F]` or None), the state before step 0.
        return_state: also return the final state.

    Returns:
        float32 `[B, H, T, D]`; with return_state, (o, (S_T `[B, H, F, D]`, z_T `[B, H, F]`)).
    """
    B, H, T, F, D = check_qkv(q, k, v)
    check_chunk(chunk)
    q, k, v = q.to(f32), k.to(f32), v.to(f32)
    S0, z0 = _linear_init(initial_state, B, H, F, D, q.device)
    S = torch.zeros(B, H, F, D, dtype=f32, device=q.device) if S0 is None else S0
    z = torch.zeros(B, H, F, dtype=f32, device=q.device) if z0 is None else z0
    outs = []
    for c0 in range(0, T, chunk):
        qc, kc, vc = q[:, :, c0:c0 + chunk], k[:, :, c0:c0 + chunk], v[:, :, c0:c0 + chunk]
        n = qc.shape[2]
        A = (qc @ kc.transpose(-1, -2)).masked_fill(~_causal(None, n, n, q.device), 0.0)  # [B, H, n, n]
        o = qc @ S + A @ vc
        if normalize:
            o = o / ((qc * z[:, :, None]).sum(-1, keepdim=True) + A.sum(-1, keepdim=True) + eps)
        outs.append(o)
        S = S + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(2)
    o = torch.cat(outs, 2) if T else v.new_zeros(B, H, 0, D)
    return (o, (S, z)) if return_state else o


def linear_pattern(q: torch.Tensor, k: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6,
                   rows: slice | None = None) -> torch.Tensor:
    """The implicit attention pattern of causal linear attention: P with o = P @ v (no initial state).

    Args:
        q: `[B, H, T, F]`.
        k: `[B, H, T, F]`.
        normalize: as in `linear_recurrent` (P_ij = q_i·k_j / (Σ_{j'<=i} q_i·k_j' + eps)).
        eps: as in `linear_recurrent` (P_ij = q_i·k_j / (Σ_{j'<=i} q_i·k_j' + eps)).
        rows: optional slice of query rows; only those rows are computed (O(rows·T) memory).

    Returns:
        float32 `[B, H, n_rows, T]` (n_rows = T without `rows`), zero above the diagonal.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, H, T, F] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}")
    T = q.shape[2]
    idx, hi = row_index(rows, T)
    qr = q.to(f32) if idx is None else q.to(f32)[:, :, idx.to(q.device)]
    A = qr @ k.to(f32)[:, :, :hi].transpose(-1, -2)  # [B, H, n, hi]
    A = A.masked_fill(~_causal(idx, qr.shape[2], hi, q.device), 0.0)
    if normalize:
        A = A / (A.sum(-1, keepdim=True) + eps)
    return _pad_keys(A, T)
