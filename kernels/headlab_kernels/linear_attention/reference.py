"""Pure-torch causal linear attention in three forms each: the spec of the Triton kernels and the CPU path.

Three recurrences, each written as a python loop over time (`*_recurrent`, the definition), as one
`[T, T]` mixing matrix applied to v (`*_parallel`, O(T²) memory) and chunkwise (`*_chunked`: the
`[chunk, chunk]` form inside a chunk, a state carried across chunks; O(T·chunk) memory). All three
forms of a recurrence agree to float32 rounding; all are differentiable (plain autograd).

- Linear (kernel) attention, state S `[F, D]` and normaliser z `[F]`:
      S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t,
      o_t = (q_tᵀ S_t) / (q_t · z_t + eps)   (normalize=True),   o_t = q_tᵀ S_t   (normalize=False).
- Gated linear attention (GLA), state S `[F, D]`, per-feature log decay g_t `[F]` (<= 0):
      S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t.
- DeltaNet (delta rule), state S `[D, F]`, write strength beta_t in (0, 1):
      S_t = S_{t-1} (I - beta_t k_t k_tᵀ) + beta_t v_t k_tᵀ,   o_t = S_t q_t.

Inputs: q, k `[B, H, T, F]` already feature-mapped (and scaled) by the caller, v `[B, H, T, D]`,
any float dtype; the math is float32 and every output is float32 `[B, H, T, D]`. The `*_pattern`
functions return the implicit attention pattern, the `[B, H, T, T]` matrix P with o = P @ v
exactly (no initial state), or only some of its query rows.
"""

from __future__ import annotations

import torch

from .common import check_beta, check_chunk, check_g, check_qkv, check_state, row_index

__all__ = [
    "linear_recurrent", "linear_parallel", "linear_chunked", "linear_pattern",
    "gla_recurrent", "gla_parallel", "gla_chunked", "gla_pattern",
    "delta_recurrent", "delta_parallel", "delta_chunked", "delta_pattern",
]

f32 = torch.float32


def _causal(i_idx: torch.Tensor | None, n_rows: int, n_keys: int, device: torch.device,
            strict: bool = False) -> torch.Tensor:
    """Bool `[n_rows, n_keys]`: key j is visible from query row i (j <= i; j < i when strict)."""
    i = torch.arange(n_rows, device=device) if i_idx is None else i_idx.to(device)
    j = torch.arange(n_keys, device=device)
    return (j[None, :] < i[:, None]) if strict else (j[None, :] <= i[:, None])


def _pad_keys(p: torch.Tensor, T: int) -> torch.Tensor:
    """Zero columns for the keys past the last selected row (none of them is visible)."""
    return p if p.shape[-1] == T else torch.nn.functional.pad(p, (0, T - p.shape[-1]))


# --------------------------------------------------------------------------------------------- linear


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

    Parameters
    ----------
    q, k : `[B, H, T, F]`, feature-mapped (for normalize=True keep q·k > 0, e.g. elu+1 features).
    v : `[B, H, T, D]`.
    normalize : divide q_tᵀ S_t by q_t · z_t + eps.
    eps : added to the normaliser.
    initial_state : optional (S0 `[B, H, F, D]`, z0 `[B, H, F]` or None), the state before step 0.
    return_state : also return the final state.

    Returns
    -------
    o : float32 `[B, H, T, D]`; with return_state, (o, (S_T `[B, H, F, D]`, z_T `[B, H, F]`)).
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
    Arguments and result as in `linear_recurrent`.
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

    O(T·chunk) memory; the last chunk may be shorter. Arguments and result as in `linear_recurrent`.
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

    Parameters
    ----------
    q, k : `[B, H, T, F]`.
    normalize, eps : as in `linear_recurrent` (P_ij = q_i·k_j / (Σ_{j'<=i} q_i·k_j' + eps)).
    rows : optional slice of query rows; only those rows are computed (O(rows·T) memory).

    Returns
    -------
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


# ----------------------------------------------------------------------------------------------- GLA


def _gla_init(initial_state, B, H, F, D):
    if isinstance(initial_state, (tuple, list)):  # accept (S,) or (S, None) for symmetry with linear
        initial_state = initial_state[0]
    return check_state(initial_state, (B, H, F, D), "initial_state S")


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                  initial_state: torch.Tensor | None = None, return_state: bool = False):
    """Gated linear attention by its definition: S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t.

    Parameters
    ----------
    q, k : `[B, H, T, F]`.
    v : `[B, H, T, D]`.
    g : `[B, H, T, F]`, per-step per-feature log decay (<= 0; larger values are allowed but then
        states grow without bound).
    initial_state : optional S0 `[B, H, F, D]`.
    return_state : also return S_T.

    Returns
    -------
    o : float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, F, D]`).
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

    Parameters
    ----------
    q, k, g : `[B, H, T, F]`.
    rows : optional slice of query rows (only they are computed).
    block : query rows per step.

    Returns
    -------
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

    o = P v (+ (q ⊙ exp(G)) S0 with an initial state). Arguments and result as in `gla_recurrent`;
    numerical range as in `gla_pattern` (no overflow for any T when g <= 0).
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
    Arguments and result as in `gla_recurrent`.
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


# --------------------------------------------------------------------------------------------- delta


def _delta_init(initial_state, B, H, F, D):
    if isinstance(initial_state, (tuple, list)):
        initial_state = initial_state[0]
    return check_state(initial_state, (B, H, D, F), "initial_state S (delta rule: [B, H, D, F])")


def delta_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                    initial_state: torch.Tensor | None = None, return_state: bool = False):
    """The delta rule by its definition: S_t = S_{t-1}(I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t.

    Parameters
    ----------
    q, k : `[B, H, T, F]` (k normally L2-normalised by the caller, so the update is a contraction).
    v : `[B, H, T, D]`.
    beta : `[B, H, T]`, write strengths in (0, 1).
    initial_state : optional S0 `[B, H, D, F]` (note: values × keys).
    return_state : also return S_T.

    Returns
    -------
    o : float32 `[B, H, T, D]`; with return_state, (o, S_T `[B, H, D, F]`).
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
    Arguments and result as in `delta_recurrent`.
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
    Arguments and result as in `delta_recurrent`.
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

    Parameters
    ----------
    q, k : `[B, H, T, F]`.
    beta : `[B, H, T]`.
    rows : optional slice of query rows.

    Returns
    -------
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
