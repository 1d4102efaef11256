"""Triton forward kernel of routed (mixture-of-head) attention: only the active (b, h, t) query rows.

Packing (torch, on the device): the active rows (gates != 0) are listed per (batch, head) as the
sorted positions of their active tokens, all (b, h) lists concatenated (`tok`, int32); each list is
cut into blocks of at most BLOCK_M rows, and a block table holds (b·H + h, first row, row count)
per block, heaviest blocks (largest last position) first so the long programs start early.

`_routed_fwd_kernel`, one program per block: loads the block's query rows (gathered by position),
walks the key blocks of its head's key/value group (h // (H // G)) from 0 up to the block's largest
position + 1 with an online softmax (running max m, sum l, accumulator acc, flash-attention style),
each row masked causally at its own position (and by key_mask), then divides by l (0 for a row that
sees no real key), multiplies by the gate and writes the row into a zero-initialised float32
`[B, T, H, D]` output. Scores and the accumulator are float32; float32 inputs use tl.dot's
input_precision "ieee" by default ("tf32" is faster on GPUs and looser).

Forward only (no autograd). Note: tuned for nothing yet (written and tested under the CPU
interpreter only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import check_inputs

__all__ = ["pack_active_rows", "routed_triton"]


@triton.jit
def _routed_fwd_kernel(Q, K, V, GATES, KM, TOK, BLK, O,
                       sq_b, sq_h, sq_t, sq_d, sk_b, sk_g, sk_t, sk_d, sv_b, sv_g, sv_t, sv_d,
                       sg_b, sg_t, sg_h, skm_b, so_b, so_t, so_h,
                       H, R, D, scale,
                       HAS_KM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    bh = tl.load(BLK + pid * 3)  # int64 block table: (b·H + h, first row in TOK, rows)
    start = tl.load(BLK + pid * 3 + 1)
    n = tl.load(BLK + pid * 3 + 2)
    b = bh // H
    h = bh % H
    g = h // R  # grouped-query attention: the head's key/value group
    offs_m = tl.arange(0, BM)
    rm = offs_m < n
    t = tl.load(TOK + start + offs_m, mask=rm, other=0).to(tl.int64)  # [BM] positions, ascending
    hi = tl.load(TOK + start + n - 1) + 1  # keys the block needs: up to its last (largest) position
    offs_d = tl.arange(0, BD)
    dm = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=rm[:, None] & dm[None, :], other=0.0)  # [BM, BD]
    if UPCAST:  # the CPU interpreter's tl.dot mishandles 16-bit floats
        q = q.to(tl.float32)
    k_base = K + b * sk_b + g * sk_g
    v_base = V + b * sv_b + g * sv_g
    m_i = tl.full([BM], -1.0e30, tl.float32)  # finite: exp(-inf - m) = 0 even before any visible key
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for n0 in range(0, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < hi
        kt = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=nm[:, None] & dm[None, :],
                     other=0.0)  # [BN, BD]
        vt = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=nm[:, None] & dm[None, :],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale  # [BM, BN] float32
        vis = rm[:, None] & (offs_n[None, :] <= t[:, None])
        if HAS_KM:
            km = tl.load(KM + b * skm_b + offs_n, mask=nm, other=0)
            vis = vis & (km[None, :] != 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # masked: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    o = tl.where(seen[:, None], o, 0.0)  # a row that sees no real key: 0, not NaN
    gate = tl.load(GATES + b * sg_b + t * sg_t + h * sg_h, mask=rm, other=0.0).to(tl.float32)
    tl.store(O + b * so_b + t[:, None] * so_t + h * so_h + offs_d[None, :], o * gate[:, None],
             mask=rm[:, None] & dm[None, :])


def pack_active_rows(gates: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's row lists: (tok, blocks) for gates `[B, T, H]` (active = gates != 0).

    Returns:
        tok: int32 `[N]`, the positions of the N active rows, grouped by (b, h) in order, ascending
            within each (b, h).
        blocks: int64 `[n_blocks, 3]`, per block (b·H + h, index of its first row in tok, its row
            count <= block_m), sorted by the block's last position, descending (the heaviest first).
    """
    B, T, H = gates.shape
    dev = gates.device
    act = (gates != 0).permute(0, 2, 1).reshape(B * H, T)  # [B·H, T]
    counts = act.sum(1)  # [B·H]
    tok = act.nonzero()[:, 1].to(torch.int32)  # row-major: by (b, h), then t ascending
    first_row = torch.cumsum(counts, 0) - counts
    n_blk = (counts + block_m - 1) // block_m
    bh = torch.repeat_interleave(torch.arange(B * H, device=dev), n_blk)
    j = torch.arange(bh.numel(), device=dev) - (torch.cumsum(n_blk, 0) - n_blk)[bh]  # block index within its (b, h)
    start = first_row[bh] + j * block_m
    rows = torch.clamp(counts[bh] - j * block_m, max=block_m)
    blocks = torch.stack([bh, start, rows], 1).to(torch.int64)
    if blocks.shape[0]:
        last = tok[(start + rows - 1)].to(torch.int64)
        blocks = blocks[torch.argsort(last, descending=True, stable=True)].contiguous()
    return tok, blocks


def routed_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                  scale: float | None = None, key_mask: torch.Tensor | None = None, block_m: int = 64,
                  block_n: int = 64, precision: str = "ieee") -> torch.Tensor:
    """Routed gated causal attention, Triton forward; the result of `reference.dense_gated`.

    Args:
        q: `[B, H, T, D]`; k, v: `[B, G, T, D]` (H % G == 0); any strides; float16 / bfloat16 /
            float32 (float64 is refused: the kernel's math is float32; use impl="torch").
        gates: `[B, T, H]`, 0 = off; key_mask: bool `[B, T]`, False = padding key.
        scale: softmax scale (default D ** -0.5).
        block_m: active rows per program (a power of two >= 16).
        block_n: keys per step of the online softmax (a power of two >= 16).
        precision: tl.dot input precision for float32 inputs, "ieee" (exact) or "tf32".

    Returns:
        float32 `[B, T, H, D]`, zero where the gate is 0. Not differentiable (forward only).
    """
    c = check_inputs(q, k, v, gates, scale=scale, key_mask=key_mask)
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(blk, int) or blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {blk!r}")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32'; got {precision!r}")
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        raise ValueError("the Triton routed kernel computes in float32 and takes no float64 inputs; "
                         "use impl='torch' for float64")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k, v = q.float(), k.float(), v.float()
    out = torch.zeros(c.B, c.T, c.H, c.D, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    tok, blocks = pack_active_rows(c.gates, block_m)
    if blocks.shape[0] == 0:
        return out
    dummy = torch.zeros(1, dtype=torch.uint8, device=q.device)
    km = c.key_mask.contiguous().view(torch.uint8) if c.key_mask is not None else dummy
    gates_ = c.gates
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _routed_fwd_kernel[(blocks.shape[0],)](
        q, k, v, gates_, km, tok, blocks, out,
        *q.stride(), *k.stride(), *v.stride(), *gates_.stride(),
        km.stride(0) if c.key_mask is not None else 0, *out.stride()[:3],
        c.H, c.heads_per_group, c.D, c.scale,
        HAS_KM=c.key_mask is not None, BM=block_m, BN=block_n, BD=max(16, triton.next_power_of_2(c.D)),
        PRECISION=precision if q.dtype == torch.float32 else "tf32",  # only float32 dots read it
        UPCAST=interpreted and q.dtype != torch.float32)
    return out
