"""Pure-torch head statistics, chunked over queries: the spec of the Triton kernel and the CPU path.

Queries are taken `block_q` at a time; for each block the scores `[B, H, block_q, S]` are
computed once (one batched matmul per kv head, the query heads of a group stacked along the rows,
so no `repeat_kv` copy of k), the softmax is exact, every statistic is reduced, and the block is
dropped. Nothing larger than two such blocks is alive at a time. Under `causal` a block only
looks at the keys its last query can see.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .common import NEG, HeadStats, Inputs, check_inputs


def head_stats_reference(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool,
                         mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                         query_mask: torch.Tensor | None = None,
                         key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, topk: int = 1,
                         block_q: int = 64) -> HeadStats:
    """Statistics of softmax(scale · q kᵀ) over the visible keys, one block of queries at a time.

    Args:
        q: `[B, Hq, T, D]` (any float dtype; math in float32).
        k: `[B, Hkv, S, D]`, Hq a multiple of Hkv.
        scale: the softmax scale applied to q·k.
        causal: query i sees keys j <= i + S - T (bottom-right aligned when S > T).
        mask: bool `[B|1, 1, T, S]` (True = may attend), intersected with `causal` and the other masks.
        key_mask: bool `[B, S]`, True for real keys (padding = False).
        query_mask: bool `[B, T]`, True for real queries; defaults from `key_mask` (see `check_inputs`).
        key_sets: bool `[K, B|1, S]`, or a dict name -> bool `[B, S]`.
        topk: how many top keys to report per query.
        block_q: queries per block.

    Returns:
        HeadStats (see its docstring for shapes).
    """
    inp = check_inputs(q, k, mask=mask, key_mask=key_mask, query_mask=query_mask, key_sets=key_sets, topk=topk)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dev = q.device
    f32 = torch.float32
    kt = k.to(f32).transpose(-1, -2)  # [B, Hkv, D, S]
    n_sets = inp.n_sets
    sets = inp.sets.to(f32).permute(1, 2, 0)[:, None] if inp.sets is not None else None  # [B|1, 1, S, K]

    topk_idx = torch.full((B, Hq, T, topk), -1, dtype=torch.int64, device=dev)
    topk_weight = torch.zeros(B, Hq, T, topk, dtype=f32, device=dev)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=f32, device=dev)
    entropy = torch.zeros(B, Hq, T, dtype=f32, device=dev)
    set_mass = torch.zeros(B, Hq, T, n_sets, dtype=f32, device=dev)
    received = torch.zeros(B, Hq, S, dtype=f32, device=dev)
    n_visible = torch.zeros(B, S, dtype=f32, device=dev)

    for i0 in range(0, T, block_q):
        i1 = min(T, i0 + block_q)
        n = i1 - i0
        s_hi = min(S, i1 + S - T) if causal else S  # the last query of the block sees keys < s_hi
        if s_hi <= 0:
            continue  # no query of this block sees any key: the defaults above hold
        qb = (q[:, :, i0:i1].to(f32) * scale).reshape(B, Hkv, G * n, D)  # [B, Hkv, G*n, D]
        x = torch.matmul(qb, kt[..., :s_hi]).view(B, Hq, n, s_hi)  # [B, H, n, s_hi] scores
        key_vis, causal_vis, c0 = _block_masks(inp, causal, i0, i1, s_hi, T, S, dev)
        if key_vis is None and causal_vis is not None:  # only the causal triangle: fill just its columns
            x[..., c0:].masked_fill_(~causal_vis[..., c0:], NEG)
        elif key_vis is not None:
            x.masked_fill_(~(key_vis if causal_vis is None else key_vis & causal_vis), NEG)
        vis = _both(_both(key_vis, causal_vis),
                    None if inp.query_mask is None else inp.query_mask[:, None, i0:i1, None])  # [B|1, 1, n, s_hi]
        if vis is None:
            n_visible[:, :s_hi] += n
            keep = None  # every row is a real query that sees some key
        else:
            n_visible[:, :s_hi] += vis.sum(-2, dtype=f32)[:, 0] * (n if vis.shape[-2] == 1 else 1)
            keep = vis.any(-1).expand(vis.shape[0], 1, n)  # [B|1, 1, n]
            keep = None if bool(keep.all()) else keep

        if topk == 1:
            top = x.argmax(-1, keepdim=True)  # [B, H, n, 1]
        else:
            top = x.topk(min(topk, s_hi), dim=-1).indices  # [B, H, n, k']
        m = x.gather(-1, top[..., :1])[..., 0]  # row max  [B, H, n]
        ls = torch.log_softmax(x, dim=-1)  # log p; NEG - lse where masked
        p = torch.exp(ls, out=x)  # [B, H, n, s_hi], reusing the scores' memory
        top_ls = ls.gather(-1, top)  # [B, H, n, k']
        row_lse = m - top_ls[..., 0]
        row_ent = -torch.einsum("bhqs,bhqs->bhq", p, ls)
        if keep is None:
            received[:, :, :s_hi] += p.sum(-2)
        else:
            received[:, :, :s_hi] += torch.matmul(keep.to(f32).unsqueeze(-2), p)[..., 0, :]
        seen = top_ls > NEG / 2  # a visible key, not a masked one
        if sets is not None:
            set_mass[:, :, i0:i1] = torch.matmul(p, sets[:, :, :s_hi])  # [B, H, n, K]
        if keep is not None:
            row_lse = row_lse.masked_fill(~keep, float("-inf"))
            row_ent = row_ent.masked_fill(~keep, 0.0)
            seen = seen & keep[..., None]
            if sets is not None:
                set_mass[:, :, i0:i1] *= keep[..., None]
        lse[:, :, i0:i1] = row_lse
        entropy[:, :, i0:i1] = row_ent.clamp_min(0.0)
        kk = top.shape[-1]
        topk_weight[:, :, i0:i1, :kk] = torch.where(seen, torch.exp(top_ls), 0.0)
        topk_idx[:, :, i0:i1, :kk] = torch.where(seen, top, -1)
    return HeadStats(topk_idx=topk_idx, topk_weight=topk_weight, lse=lse, entropy=entropy, set_mass=set_mass,
                     received=received, n_visible=n_visible, set_names=inp.set_names)


def _both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


def _block_masks(inp: Inputs, causal: bool, i0: int, i1: int, s_hi: int, T: int, S: int,
                 dev: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Which of the first s_hi keys queries i0..i1-1 may see, before query padding.

    Returns:
        key_vis: bool `[B|1, 1, n|1, s_hi]` from `mask` and `key_mask` (None: no such mask);
        causal_vis: bool `[1, 1, n, s_hi]` (None: not causal, or no query of the block is cut);
        c0: the first column the causal cut touches.
    """
    key_vis = _both(None if inp.mask is None else inp.mask[:, :, i0:i1, :s_hi],
                    None if inp.key_mask is None else inp.key_mask[:, None, None, :s_hi])
    c0 = max(0, i0 + S - T + 1)  # the first query sees keys < c0
    causal_vis = None
    if causal and c0 < s_hi:
        rows = torch.arange(i0, i1, device=dev)[:, None] + (S - T)
        causal_vis = (torch.arange(s_hi, device=dev)[None, :] <= rows)[None, None]
    return key_vis, causal_vis, c0
