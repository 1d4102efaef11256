"""The O(T²) definition of the head statistics: the full softmax pattern, materialised in float64.

`head_stats_materialised` builds the whole `[B, H, T, S]` attention matrix and reads every statistic
off it. It is the spec that the chunked torch reference (`reference.head_stats_reference`) and the
Triton kernels (`triton.head_stats_triton`) are checked against in the tests; it is far too big for
real lengths (T·S float64 entries per head) and is not used by `head_stats` itself.
"""

from __future__ import annotations

import torch

__all__ = ["head_stats_materialised"]


def head_stats_materialised(q, k, *, scale, causal, topk, mask=None, key_mask=None, key_sets=None) -> dict:
    """Every statistic from the full float64 pattern `[B, H, T, S]` (the O(T²) definition).

    The kernels are checked against this: A = softmax(scale · q kᵀ) over the visible keys, computed
    in float64 from the given (possibly bf16-rounded) inputs, with the visibility rules of
    `head_stats`: query i sees key j <= i + S - T under `causal` (bottom-right aligned), a bool
    `mask` `[B|1, 1, T, S]` is intersected with it, and a `key_mask` `[B, S]` hides padded keys and,
    when S >= T, also marks the queries (the default `query_mask` of `head_stats`; there is no
    separate `query_mask` argument here).

    Args:
        q: `[B, Hq, T, D]`.
        k: `[B, Hkv, S, D]`, Hq a multiple of Hkv (grouped-query heads).
        scale: the softmax scale applied to q·k.
        causal: bottom-right aligned causal visibility.
        topk: how many top keys the caller compares (one more is returned, to tell ties apart).
        mask: optional bool `[B|1, 1, T, S]`, True = may attend.
        key_mask: optional bool `[B, S]`, True for real keys.
        key_sets: optional bool `[K, B|1, S]`.

    Returns:
        A dict of float64 tensors (rows that see no key: A = 0, lse = -inf, entropy = 0):
        A `[B, H, T, S]` the pattern; lse and entropy `[B, H, T]`; received `[B, H, S]` (column sums
        of A); n_visible `[B, S]` (how many queries see each key); top_w / top_i `[B, H, T,
        min(topk + 1, S)]` (A.topk, weights descending, ties in torch's order); n_vis_row `[B, H, T]`
        (visible keys per row, int64); set_mass `[B, H, T, K]` (A @ key_sets, None without key sets).
    """
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    vis = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        vis &= torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
    if mask is not None:
        vis &= mask
    if key_mask is not None:
        vis &= key_mask[:, None, None, :]
        if S >= T:
            vis &= key_mask[:, None, S - T:, None]
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    scores = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    A = torch.softmax(scores, -1).nan_to_num(0.0)  # [B, H, T, S]
    w, idx = A.topk(min(topk + 1, S), dim=-1)  # one extra to tell ties with the k+1-th key
    n_vis_row = vis.sum(-1).expand(B, Hq, T)
    return dict(
        A=A, lse=torch.logsumexp(scores, -1), entropy=-torch.special.xlogy(A, A).sum(-1),
        received=A.sum(-2), n_visible=vis.sum(-2)[:, 0].double(), top_w=w, top_i=idx, n_vis_row=n_vis_row,
        set_mass=(A @ key_sets.double().permute(1, 2, 0)[:, None]) if key_sets is not None else None,
    )
