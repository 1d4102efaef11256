"""Pure-torch gated causal attention: the dense definition and the routed path that skips unrouted heads.

Mixture-of-Head attention (MoH) gates each head's output per token:

    o[b, t, h, :] = gates[b, t, h] · Σ_j softmax_j(scale · q[b, h, t] · k[b, g(h), j]) v[b, g(h), j],
    the softmax and the sum over the keys j <= t with key_mask[b, j] (the real causal prefix),

with g(h) = h // (H // G) (grouped-query attention) and gates = 0 for the heads that are off for
that token. A query that sees no real key (every key up to it is padding) gets 0, not NaN.

- `dense_gated`: the definition. Every (b, h, t) row against its causal prefix, the full `[B, H, T, T]`
  score matrix materialised, then the gate multiply. The spec the other paths are checked against.
- `routed_torch`: the same numbers, computing only the active rows (gates != 0). Per (batch, key/value
  group), the active (token, head) pairs of the group's heads are gathered (sorted by token); they
  are cut into blocks of consecutive positions (`block` positions each), and each block's rows are
  one matmul against the keys up to the block's last active position, masked causally row by row;
  softmax, one matmul with v, gate multiply, scatter into a zero output. The work is that of the
  active rows (plus at most `block` keys per row of slack), not of every (token, head).

Inputs: q `[B, H, T, D]`, k and v `[B, G, T, D]`, gates `[B, T, H]`, key_mask bool `[B, T]`.
The math is float32 (float64 when q is float64) and so is the output `[B, T, H, D]`.
"""

from __future__ import annotations

import torch

from .common import check_inputs

__all__ = ["dense_gated", "routed_torch"]


def dense_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                scale: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of every head, multiplied by the gates: the definition, O(T²) memory.

    Args:
        q: `[B, H, T, D]`.
        k: `[B, G, T, D]` with H % G == 0 (head h reads group h // (H // G)).
        v: `[B, G, T, D]`.
        gates: `[B, T, H]`, 0 = head off for that token (any other value scales the head's output).
        scale: softmax scale (default D ** -0.5).
        key_mask: bool `[B, T]`, False = padding key; a query that sees no real key gets 0.

    Returns:
        `[B, T, H, D]` = gates[..., None] · attention output, float32 (float64 for float64 q).
    """
    c = check_inputs(q, k, v, gates, scale=scale, key_mask=key_mask)
    dt, R = c.dtype, c.heads_per_group
    kk = k.to(dt).repeat_interleave(R, dim=1)  # [B, H, T, D]
    vv = v.to(dt).repeat_interleave(R, dim=1)
    s = q.to(dt) @ kk.transpose(-1, -2) * c.scale  # [B, H, T, T]
    pos = torch.arange(c.T, device=q.device)
    vis = (pos[None, :] <= pos[:, None])[None, None]  # [1, 1, T, T]
    if c.key_mask is not None:
        vis = vis & c.key_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)  # no visible key: 0, not NaN
    o = (p @ vv).transpose(1, 2)  # [B, T, H, D]
    return o * c.gates.to(dt)[..., None]


def routed_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                 scale: float | None = None, key_mask: torch.Tensor | None = None,
                 block: int = 128) -> torch.Tensor:
    """`dense_gated`'s output, computing only the active (b, h, t) rows (gates != 0).

    Per (batch, key/value group): gather the active (token, head) rows of the group's heads, sorted by
    token; for each block of `block` consecutive positions, one matmul of its rows against the keys up
    to its last active position, the causal (and key_mask) mask per row, softmax, one matmul with v;
    then the gate multiply and a scatter into a zero `[B, T, H, D]`. Python loops run over batches,
    groups and position blocks (B · G · T / block iterations at most), never over tokens.

    Args:
        q: `[B, H, T, D]`.
        k: `[B, G, T, D]` with H % G == 0 (head h reads group h // (H // G)).
        v: `[B, G, T, D]`.
        gates: `[B, T, H]`, 0 = head off for that token (any other value scales the head's output).
        scale: softmax scale (default D ** -0.5).
        key_mask: bool `[B, T]`, False = padding key; a query that sees no real key gets 0.
        block: positions per block (a row computes at most `block` - 1 keys beyond its own prefix).

    Returns:
        `[B, T, H, D]`, float32 (float64 for float64 q); zero where the gate is 0.
    """
    c = check_inputs(q, k, v, gates, scale=scale, key_mask=key_mask)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    dt, R = c.dtype, c.heads_per_group
    dev = q.device
    out = torch.zeros(c.B, c.T, c.H, c.D, dtype=dt, device=dev)
    if out.numel() == 0:
        return out
    active = c.gates != 0  # [B, T, H]
    keys = torch.arange(c.T, device=dev)
    cuts = torch.arange(block, c.T + block, block, device=dev)  # position-block ends
    for b in range(c.B):
        pad = n_real = None
        if c.key_mask is not None:
            pad = ~c.key_mask[b]  # [T], True = padding key
            n_real = torch.cumsum(c.key_mask[b], 0)  # real keys at positions <= t
        for g in range(c.G):
            pairs = active[b, :, g * R:(g + 1) * R].nonzero()  # [N, 2] (t, r), sorted by t
            n = pairs.shape[0]
            if n == 0:
                continue
            t_idx = pairs[:, 0]
            h_idx = pairs[:, 1] + g * R
            qr = q[b, h_idx, t_idx].to(dt) * c.scale  # [N, D], the scale folded into the rows
            kb = k[b, g].to(dt)  # [T, D]
            vb = v[b, g].to(dt)
            rows = torch.empty(n, c.D, dtype=dt, device=dev)
            ends = torch.searchsorted(t_idx, cuts)  # row index where each position block ends
            his = (t_idx[(ends - 1).clamp_min(0)] + 1).tolist()  # keys each block needs
            start = 0
            for i, (e, hi) in enumerate(zip(ends.tolist(), his)):  # host syncs: two per (b, g)
                if e == start:
                    continue
                c0 = i * block  # the block's rows sit at positions >= c0: keys < c0 are causally visible to all
                s = qr[start:e] @ kb[:hi].T  # [n_blk, hi]
                s[:, c0:].masked_fill_(keys[None, c0:hi] > t_idx[start:e, None], float("-inf"))
                if pad is not None:
                    s.masked_fill_(pad[None, :hi], float("-inf"))
                rows[start:e] = torch.softmax(s, -1) @ vb[:hi]  # [n_blk, D]
                start = e
            o = rows * c.gates[b, t_idx, h_idx].to(dt)[:, None]
            if n_real is not None:  # rows that see no real key: softmax gave NaN, the definition says 0
                o = torch.where((n_real[t_idx] > 0)[:, None], o, 0.0)
            out[b, t_idx, h_idx] = o
    return out
