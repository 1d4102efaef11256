"""Triton head statistics: flash-attention-style passes that never hold more than a tile of scores.

Two kernels, the signature of `head_stats_reference` outside:
- `_rows_kernel`, one program per (query block, batch, query head), walks the key blocks with an
  online softmax (running max m, sum l) and carries along what can be rescaled when m grows: the
  entropy term Σ e^{s-m}(s-m), the key-set masses Σ_{j∈set} e^{s-m} (a dot of the weights with the
  set indicators, like flash attention's P·V), and the running top-k scores. It writes lse, entropy,
  set masses and the top-k.
- `_cols_kernel`, one program per (key block, batch, query head), is the second pass over keys: the
  attention a key receives needs every row's normaliser first, so it walks the query blocks,
  recomputes the scores and sums exp(s - lse) down each column (no atomics: deterministic). It also
  counts the queries that see each key.
Scores are float32 (tl.dot accumulates in float32; float32 inputs use input_precision "ieee", as
TF32 would move near-tied top-k). Masks travel as uint8 views, broadcast batches as stride 0.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import triton
import triton.language as tl

from .common import HeadStats, check_inputs


@triton.jit
def _scores(q, K, kv_base, offs_n, offs_d, stride_ks, stride_kd, S, D, scale, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """Scaled scores of a query tile `[BM, BD]` against keys offs_n: `[BM, BN]` float32."""
    k = tl.load(K + kv_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)  # [BN, BD]
    if UPCAST:  # the CPU interpreter's tl.dot mishandles 16-bit floats
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BM, BN]


@triton.jit
def _visible(b, offs_m, offs_n, real_m, M, KM, T, S, stride_mb, stride_mt, stride_ms, stride_kmb,
             CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KM: tl.constexpr):
    """Bool `[BM, BN]`: query offs_m (a real one) may see key offs_n."""
    vis = real_m[:, None] & (offs_n[None, :] < S)  # [BM, BN]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + (S - T))
    if HAS_MASK:
        mk = tl.load(M + b * stride_mb + offs_m[:, None].to(tl.int64) * stride_mt + offs_n[None, :] * stride_ms,
                     mask=vis, other=0)  # [BM, BN]
        vis = vis & (mk != 0)
    if HAS_KM:
        km = tl.load(KM + b * stride_kmb + offs_n, mask=offs_n < S, other=0)  # [BN]
        vis = vis & (km[None, :] != 0)
    return vis


@triton.jit
def _real_queries(b, offs_m, QM, T, stride_qmb, HAS_QM: tl.constexpr):
    """Bool `[BM]`: the query exists and is not padding."""
    real = offs_m < T
    if HAS_QM:
        real = real & (tl.load(QM + b * stride_qmb + offs_m, mask=real, other=0) != 0)
    return real


@triton.jit
def _rows_kernel(Q, K, M, KM, QM, SETS, LSE, ENT, TOPI, TOPW, MASS, V, OUT,
                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_mb, stride_mt, stride_ms, stride_kmb, stride_qmb, stride_sb, stride_ss,
                 stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_ot, stride_oh, stride_od,
                 Hq, G, T, S, D, DV, NSET, scale,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KM: tl.constexpr, HAS_QM: tl.constexpr,
                 HAS_SETS: tl.constexpr, TOPK: tl.constexpr, TOPKP: tl.constexpr, NSETP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, HAS_V: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # 64-bit offsets: B·H·T·D and T·S can pass 2^31
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    real_m = _real_queries(b, offs_m, QM, T, stride_qmb, HAS_QM)  # [BM]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)  # [BM, BD]
    kv_base = b * stride_kb + (h // G) * stride_kh

    m_i = tl.full([BM], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BM], tl.float32)  # Σ e^{s-m}
    t_i = tl.zeros([BM], tl.float32)  # Σ e^{s-m} (s-m)
    mass = tl.zeros([BM, NSETP], tl.float32)  # Σ_{j in set} e^{s-m}
    offs_c = tl.arange(0, NSETP)
    acc = tl.zeros([BM, BDV], tl.float32)  # Σ e^{s-m} v: the attention output, as flash attention makes it
    offs_dv = tl.arange(0, BDV)
    v_base = b * stride_vb + (h // G) * stride_vh
    if TOPK == 1:
        top1_s = tl.full([BM], float("-inf"), tl.float32)  # best score so far
        top1_i = tl.full([BM], -1, tl.int32)
    else:
        slots = tl.arange(0, TOPKP)
        live = slots[None, :] < TOPK  # [1, TOPKP]: slots past TOPK are never evicted nor reported
        top_s = tl.where(live, float("-inf"), float("inf")) + tl.zeros([BM, TOPKP], tl.float32)  # [BM, TOPKP]
        top_i = tl.zeros([BM, TOPKP], tl.int32) - 1 - slots[None, :]  # distinct negative ids while empty

    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BM + S - T)
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        s = _scores(q, K, kv_base, offs_n, offs_d, stride_ks, stride_kd, S, D, scale, PRECISION, UPCAST)  # [BM, BN]
        vis = _visible(b, offs_m, offs_n, real_m, M, KM, T, S, stride_mb, stride_mt, stride_ms, stride_kmb,
                       CAUSAL, HAS_MASK, HAS_KM)  # [BM, BN]
        s = tl.where(vis, s, float("-inf"))
        s_max = tl.max(s, 1)  # [BM]
        m_new = tl.maximum(m_i, s_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exps finite
        alpha = tl.exp(m_i - m_safe)  # [BM]
        p = tl.exp(s - m_safe[:, None])  # [BM, BN], 0 where invisible
        x = tl.where(vis, s - m_safe[:, None], 0.0)
        shift = tl.where(l_i > 0, m_i - m_safe, 0.0)  # Σ e^{s-m}(s-m) seen from the new max
        t_i = alpha * (t_i + shift * l_i) + tl.sum(p * x, 1)
        l_i = alpha * l_i + tl.sum(p, 1)
        m_i = m_new
        if HAS_SETS:
            ind = tl.load(SETS + b * stride_sb + offs_n[:, None] * stride_ss + offs_c[None, :],
                          mask=(offs_n[:, None] < S) & (offs_c[None, :] < NSET), other=0.0)  # [BN, NSETP]
            mass = mass * alpha[:, None] + tl.dot(p, ind, input_precision="ieee")
        if HAS_V:
            v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                        mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)  # [BN, BDV]
            if UPCAST or v.dtype == tl.float32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
            else:  # 16-bit values: the weights rounded to their dtype, as flash attention does
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if TOPK == 1:  # strictly better only: on ties the earlier (lower) key stays
            best_n = tl.min(tl.where(s == s_max[:, None], offs_n[None, :], 2147483647), 1)  # [BM]
            put1 = s_max > top1_s
            top1_s = tl.where(put1, s_max, top1_s)
            top1_i = tl.where(put1, best_n, top1_i)
        else:  # move the block's best TOPK scores into the running set, each evicting its worst entry
            cand = s  # [BM, BN]
            for j in tl.static_range(TOPK):
                if j == 0:
                    best = s_max
                else:
                    best = tl.max(cand, 1)  # [BM]
                best_n = tl.min(tl.where(cand == best[:, None], offs_n[None, :], 2147483647), 1)  # lowest key
                worst = tl.min(top_s, 1)
                evict = tl.max(tl.where(top_s == worst[:, None], top_i, -2147483647), 1)  # highest key on ties
                put = (top_i == evict[:, None]) & (best > worst)[:, None]  # [BM, TOPKP]
                top_s = tl.where(put, best[:, None], top_s)
                top_i = tl.where(put, best_n[:, None], top_i)
                cand = tl.where(offs_n[None, :] == best_n[:, None], float("-inf"), cand)

    seen = l_i > 0
    m_safe = tl.where(seen, m_i, 0.0)
    l_safe = tl.where(seen, l_i, 1.0)
    lse_safe = m_safe + tl.log(l_safe)  # [BM]
    lse = tl.where(seen, lse_safe, float("-inf"))
    inv = tl.where(seen, 1.0 / l_safe, 0.0)
    ent = tl.where(seen, tl.maximum(tl.log(l_safe) - t_i * inv, 0.0), 0.0)
    row = pid_bh.to(tl.int64) * T + offs_m  # outputs are contiguous [B, H, T, ...]
    in_t = offs_m < T
    tl.store(LSE + row, lse, mask=in_t)
    tl.store(ENT + row, ent, mask=in_t)
    if HAS_SETS:
        tl.store(MASS + row[:, None] * NSET + offs_c[None, :], mass * inv[:, None],
                 mask=in_t[:, None] & (offs_c[None, :] < NSET))
    if HAS_V:  # out [B, T, H, DV] (any strides): 0 for a row that sees no key
        o = acc * inv[:, None]
        tl.store(OUT + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_ot + h * stride_oh
                 + offs_dv[None, :] * stride_od, o.to(OUT.dtype.element_ty),
                 mask=in_t[:, None] & (offs_dv[None, :] < DV))
    if TOPK == 1:
        got = top1_s > float("-inf")
        tl.store(TOPW + row, tl.where(got, tl.exp(tl.where(got, top1_s, lse_safe) - lse_safe), 0.0), mask=in_t)
        tl.store(TOPI + row, top1_i.to(tl.int64), mask=in_t)
    else:
        for j in tl.static_range(TOPK):  # report the running set best first, lower key first on ties
            best = tl.max(tl.where(live, top_s, float("-inf")), 1)
            pick = tl.min(tl.where(live & (top_s == best[:, None]), top_i, 2147483647), 1)  # [BM]
            got = best > float("-inf")
            w = tl.where(got, tl.exp(tl.where(got, best, lse_safe) - lse_safe), 0.0)
            tl.store(TOPW + row * TOPK + j, w, mask=in_t)
            tl.store(TOPI + row * TOPK + j, tl.where(got, pick, -1).to(tl.int64), mask=in_t)
            top_s = tl.where(top_i == pick[:, None], float("-inf"), top_s)
            live = live & (top_i != pick[:, None])


@triton.jit
def _cols_kernel(Q, K, M, KM, QM, LSE, REC, NVIS,
                 stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_mb, stride_mt, stride_ms, stride_kmb, stride_qmb,
                 Hq, G, T, S, D, scale,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KM: tl.constexpr, HAS_QM: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # 64-bit offsets: B·H·T·D and T·S can pass 2^31
    h = (pid_bh % Hq).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    kv_base = b * stride_kb + (h // G) * stride_kh
    q_base = b * stride_qb + h * stride_qh
    rec = tl.zeros([BN], tl.float32)
    cnt = tl.zeros([BN], tl.float32)

    lo = 0
    if CAUSAL:  # query i sees key j when i >= j - (S - T): skip the query blocks above the first key
        lo = tl.maximum(pid_n * BN - (S - T), 0) // BM * BM
    for start_m in range(lo, T, BM):
        offs_m = start_m + tl.arange(0, BM)
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)  # [BM, BD]
        s = _scores(q, K, kv_base, offs_n, offs_d, stride_ks, stride_kd, S, D, scale, PRECISION, UPCAST)  # [BM, BN]
        real_m = _real_queries(b, offs_m, QM, T, stride_qmb, HAS_QM)  # [BM]
        vis = _visible(b, offs_m, offs_n, real_m, M, KM, T, S, stride_mb, stride_mt, stride_ms, stride_kmb,
                       CAUSAL, HAS_MASK, HAS_KM)  # [BM, BN]
        lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)  # [BM]
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that see nothing: masked below anyway
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)  # [BM, BN]
        rec += tl.sum(p, 0)
        cnt += tl.sum(vis.to(tl.float32), 0)
    tl.store(REC + pid_bh.to(tl.int64) * S + offs_n, rec, mask=offs_n < S)
    tl.store(NVIS + b * S + offs_n, cnt, mask=(offs_n < S) & (offs_n * 0 + h == 0))


def head_stats_triton(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: bool,
                      mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                      query_mask: torch.Tensor | None = None,
                      key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, topk: int = 1,
                      block_m: int = 64, block_n: int = 64, precision: str = "ieee") -> HeadStats:
    """The Triton kernels behind `head_stats`; arguments and result as in `head_stats_reference`.

    q and k may be any strided float tensors (no copies unless their dtypes differ). `precision` is
    tl.dot's input_precision for float32 inputs ("ieee" exact; "tf32" faster on GPUs, looser).
    """
    stats, _ = _launch(q, k, None, scale=scale, causal=causal, mask=mask, key_mask=key_mask, query_mask=query_mask,
                       key_sets=key_sets, topk=topk, columns=True, block_m=block_m, block_n=block_n,
                       precision=precision)
    return stats


def attention_stats_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                           mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                           key_sets: torch.Tensor | None = None, topk: int = 1, received: bool = False,
                           block_m: int = 64, block_n: int = 64, precision: str = "ieee"
                           ) -> tuple[torch.Tensor, HeadStats]:
    """The attention output with the statistics, from the rows pass that computes it (flash attention's sweep,
    with P·V accumulated beside the lse, entropy, top-k and key-set masses), plus the columns pass only when
    `received` is asked for.

    Args:
        q: `[B, H, T, D]`; k: `[B, Hkv, S, D]`; v: `[B, Hkv, S, Dv]`.
        scale, causal, mask, query_mask, key_sets, topk, block_m, block_n, precision: as in `head_stats_triton`.
        received: run the columns pass (received attention and n_visible); without it those are NaN.

    Returns:
        (output `[B, T, H, Dv]` in v's dtype — the layout the model's attention returns; rows that see no key, padded
        queries included, are 0 —, HeadStats).
    """
    stats, out = _launch(q, k, v, scale=scale, causal=causal, mask=mask, key_mask=None, query_mask=query_mask,
                         key_sets=key_sets, topk=topk, columns=received, block_m=block_m, block_n=block_n,
                         precision=precision)
    return out, stats


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, *, scale: float, causal: bool,
            mask: torch.Tensor | None, key_mask: torch.Tensor | None, query_mask: torch.Tensor | None,
            key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None, topk: int, columns: bool,
            block_m: int, block_n: int, precision: str) -> tuple[HeadStats, torch.Tensor | None]:
    """Both kernels (the columns one only with `columns`); with `v`, the rows kernel also makes the output."""
    inp = check_inputs(q, k, mask=mask, key_mask=key_mask, query_mask=query_mask, key_sets=key_sets, topk=topk)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()
    if v is not None and (v.shape[:3] != (B, Hkv, S)):
        raise ValueError(f"v {tuple(v.shape)} does not fit k {tuple(k.shape)}")
    dev = q.device
    f32 = torch.float32
    n_sets = inp.n_sets
    lse = torch.empty(B, Hq, T, dtype=f32, device=dev)
    ent = torch.empty(B, Hq, T, dtype=f32, device=dev)
    topi = torch.empty(B, Hq, T, topk, dtype=torch.int64, device=dev)
    topw = torch.empty(B, Hq, T, topk, dtype=f32, device=dev)
    mass = torch.empty(B, Hq, T, n_sets, dtype=f32, device=dev)
    rec = torch.empty(B, Hq, S, dtype=f32, device=dev)
    nvis = torch.empty(B, S, dtype=f32, device=dev)
    out = torch.zeros(B, T, Hq, v.shape[-1], dtype=v.dtype, device=dev) if v is not None else None
    if T == 0 or S == 0 or B * Hq == 0:
        return HeadStats(topk_idx=topi.fill_(-1), topk_weight=topw.zero_(), lse=lse.fill_(float("-inf")),
                         entropy=ent.zero_(), set_mass=mass.zero_(), received=rec.zero_(), n_visible=nvis.zero_(),
                         set_names=inp.set_names), out
    dummy = torch.zeros(1, dtype=torch.uint8, device=dev)
    m = inp.mask.view(torch.uint8) if inp.mask is not None else dummy
    m_strides = (m.stride(0) if m.shape[0] > 1 else 0, m.stride(2), m.stride(3)) if inp.mask is not None else (0, 0, 0)
    km = inp.key_mask.view(torch.uint8) if inp.key_mask is not None else dummy
    qm = inp.query_mask.view(torch.uint8) if inp.query_mask is not None else dummy
    sets = inp.sets.to(f32).permute(1, 2, 0).contiguous() if inp.sets is not None else dummy.float()  # [B|1, S, K]
    s_stride_b = sets.stride(0) if inp.sets is not None and sets.shape[0] > 1 else 0
    s_stride_s = sets.stride(1) if inp.sets is not None else 0
    bd = max(16, triton.next_power_of_2(D))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(CAUSAL=bool(causal), HAS_MASK=inp.mask is not None, HAS_KM=inp.key_mask is not None,
                  HAS_QM=inp.query_mask is not None, BM=block_m, BN=block_n, BD=bd,
                  PRECISION=precision if q.dtype == torch.float32 else "tf32",  # only float32 dots read it
                  UPCAST=interpreted and q.dtype != torch.float32)
    q_strides = (q.stride(0), q.stride(1), q.stride(2), q.stride(3))
    k_strides = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
    km_stride = km.stride(0) if inp.key_mask is not None else 0
    qm_stride = qm.stride(0) if inp.query_mask is not None else 0

    if v is not None:
        vv = v if not common["UPCAST"] else v.float()
        v_strides = (vv.stride(0), vv.stride(1), vv.stride(2), vv.stride(3))
        o_strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
        dv = v.shape[-1]
    else:
        vv, v_strides, o_strides, dv = dummy.float(), (0, 0, 0, 0), (0, 0, 0, 0), 1
    _rows_kernel[(triton.cdiv(T, block_m), B * Hq)](
        q, k, m, km, qm, sets, lse, ent, topi, topw, mass, vv, out if out is not None else dummy.float(),
        *q_strides, *k_strides, *m_strides, km_stride, qm_stride, s_stride_b, s_stride_s, *v_strides, *o_strides,
        Hq, Hq // Hkv, T, S, D, dv, max(n_sets, 1), float(scale),
        HAS_SETS=n_sets > 0, TOPK=topk, TOPKP=max(2, triton.next_power_of_2(topk)),
        NSETP=max(16, triton.next_power_of_2(max(n_sets, 1))), HAS_V=v is not None,
        BDV=max(16, triton.next_power_of_2(dv)), **common)
    if columns:
        _cols_kernel[(triton.cdiv(S, block_n), B * Hq)](
            q, k, m, km, qm, lse, rec, nvis, *q_strides, *k_strides, *m_strides, km_stride, qm_stride,
            Hq, Hq // Hkv, T, S, D, float(scale), **common)
    else:
        rec.fill_(float("nan"))
        nvis.fill_(float("nan"))
    return HeadStats(topk_idx=topi, topk_weight=topw, lse=lse, entropy=ent, set_mass=mass, received=rec,
                     n_visible=nvis, set_names=inp.set_names), out
