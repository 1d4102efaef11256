"""Attention output and statistics from the call that computes the output: statistics that ride on the pass the
model makes.

Two routes, and `attention_with_stats` says which one ran:

- **"flash"**: ATen's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`), the kernel sdpa itself runs
  on the CPU, returns each row's log-sum-exp beside the output: the lse of every head at no extra cost, and the
  model's output bit-identical to its own sdpa call. Entropy and large key sets ride on that call as extra value
  columns; received attention needs one more flash call with the roles swapped; top-k keys cannot be had.
- **"kernel"**: headlab's compiled CPU kernel (`headlab_kernels.head_stats.cpu`, built with the machine's compiler)
  computes the output, lse, entropy, top-k keys, key-set masses and received attention in one sweep, at the cost
  of plain attention; its output equals sdpa's within float32 rounding (not bit for bit).
- **"triton"** (CUDA tensors; on the CPU only under TRITON_INTERPRET=1, for tests): the Triton rows pass of
  `head_stats` with P·V accumulated as flash attention does, so the output, lse, entropy, top-k and key-set masses
  come from one sweep; received attention takes the light columns pass (scores and exp, no values) only when asked.

"auto" on the CPU takes "flash" when only the lse (and masses on a few keys) are asked for — the output then stays
identical to the model's own — and "kernel" for anything more, where it is built; else "flash" where that can
answer. On CUDA it takes "triton" (falling back, with a warning, to the caller's full route if the kernel fails).
`attention_with_lse` is the "flash" route's lse-only form. Both return None where no route applies (CUDA tensors,
dropout, unequal q/v head sizes, an unsupported dtype); callers then fall back to the backend plus `head_stats`.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
                       causal: bool, scale: float | None, dropout: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """softmax(scale · q kᵀ + mask) v and its row log-sum-exp from one fused CPU kernel call.

    Args:
        q: `[B, H, Q, D]`; k, v: `[B, H, S, D]` (KV groups already expanded to query heads).
        mask: None, a bool mask `[B|1, 1|H, Q, S]` (True = may attend) or an additive float mask.
        causal: apply the causal mask (only with `mask=None`, as sdpa does).
        scale: the softmax scale (None: D^-1/2).

    Returns:
        (output `[B, H, Q, D]`, lse `[B, H, Q]` float32), or None when the fused route does not apply.
    """
    if (q.device.type != "cpu" or dropout or q.dtype not in _DTYPES or q.shape[-1] != v.shape[-1]
            or k.shape[1] != q.shape[1]):
        return None
    if mask is not None and causal:
        return None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, bool(causal), attn_mask=_additive_mask(mask, q.dtype), scale=scale)
    return out, lse.float()


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CPU flash kernel, its q / k zero-padded to v's head size (zeros change no score)."""
    width = v.shape[-1]
    if q.shape[-1] < width:
        q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        k = torch.nn.functional.pad(k, (0, width - k.shape[-1]))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, bool(causal),
                                                                          attn_mask=mask, scale=scale)
    return out, lse.float()


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


#: Key sets holding at most this many distinct keys (over the sets and the batch) get their masses from the lse and
#: those keys' scores directly (O(Q · u) per head) instead of as indicator columns widening the flash call.
SPARSE_SETS = 128


def _sparse_set_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_sets: torch.Tensor,
                     union: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """Mass `[B, H, Q, K]` of each row on each key set from the exact weights exp(scale · q·kⱼ − lse) of the few
    keys the sets hold (`union` `[u]`), with the visibility of the flash call (causal, bottom-right; or `mask`)."""
    n_q, n_s = q.shape[2], k.shape[2]
    scores = torch.matmul(q.float(), k.index_select(2, union).float().transpose(-1, -2)) * scale  # [B, H, Q, u]
    weights = torch.exp(scores - lse[..., None])
    if mask is not None:
        sub = mask.index_select(-1, union)
        visible = sub if sub.dtype == torch.bool else sub > torch.finfo(sub.dtype).min / 2
        weights = weights * visible
    elif causal:
        rows = torch.arange(n_q, device=q.device)[:, None] + (n_s - n_q)
        weights = weights * (union[None, :] <= rows)
    weights = weights.nan_to_num(0.0)  # rows that see no key (lse -inf)
    ind = key_sets.index_select(-1, union).float().expand(-1, q.shape[0], -1)  # [K, B, u]
    return torch.einsum("bhqu,kbu->bhqk", weights, ind)


class Fused(NamedTuple):
    """What `attention_with_stats` returns.

    Attributes:
        out: the attention output `[B, H, Q, Dv]` in q's dtype (possibly a transposed view of `[B, Q, H, Dv]`).
        stats: {"lse" `[B, H, Q]`, and "entropy" `[B, H, Q]`, "topk_idx" / "topk_weight" `[B, H, Q, k]`, "set_mass"
            `[B, H, Q, K]`, "received" `[B, H, S]` as asked}, float32 (top-k indices int64).
        route: "flash", "kernel" or "triton" (module docstring).
    """

    out: torch.Tensor
    stats: dict[str, torch.Tensor]
    route: str


ROUTES = ("auto", "flash", "kernel", "triton")


def attention_with_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
                         causal: bool, scale: float | None, entropy: bool = False,
                         key_sets: torch.Tensor | None = None, received: bool = False, topk: int = 0,
                         query_mask: torch.Tensor | None = None, route: str = "auto") -> Fused | None:
    """The attention output and the statistics asked for, from the call that computes the output.

    Args:
        q: `[B, H, Q, D]`; k, v: `[B, Hkv, S, D]` with H a multiple of Hkv (query head h reads kv head h // (H / Hkv)).
        mask: None, a bool mask `[B|1, 1|H, Q, S]` (True = may attend) or an additive float mask.
        causal: apply the causal mask (only with `mask=None`, as sdpa does).
        scale: the softmax scale (None: D^-1/2).
        entropy: compute each row's entropy (nats).
        key_sets: bool `[K, B|1, S]`: compute each row's mass on each set.
        received: compute each key's received attention, summed over real queries.
        topk: how many top keys per row to return (0: none; the "kernel" and "triton" routes only).
        query_mask: bool `[B, Q]` of the real queries (for `received`; None: all real).
        route: "auto", "flash", "kernel" or "triton" (module docstring).

    Returns:
        A `Fused` (output, statistics, the route that ran), or None where the route asked for (or, for "auto", every
        route) does not apply.

    Raises:
        ValueError: an unknown route.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
    if q.dtype not in _DTYPES or q.shape[1] % k.shape[1] or (mask is not None and causal):
        return None
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if route == "triton" or (route == "auto" and q.is_cuda):
        return _triton_route(q, k, v, mask=mask, causal=causal, scale=scale, entropy=entropy, key_sets=key_sets,
                             received=received, topk=topk, query_mask=query_mask, strict=route == "triton")
    if q.device.type != "cpu" or q.shape[-1] != v.shape[-1]:
        return None
    union = None if key_sets is None else _union(key_sets)  # [u] the keys some set holds
    light = not (entropy or received or topk) and (union is None or union.numel() <= SPARSE_SETS)
    if route == "kernel" or (route == "auto" and not light):
        res = _kernel_route(q, k, v, mask=mask, causal=causal, scale=scale, entropy=entropy, key_sets=key_sets,
                            received=received, topk=topk, query_mask=query_mask)
        if res is not None or route == "kernel":
            return res
    if topk:  # the flash call cannot return top keys
        return None
    res = _flash_route(q, k, v, mask=mask, causal=causal, scale=scale, entropy=entropy, key_sets=key_sets,
                       union=union, received=received, query_mask=query_mask)
    return None if res is None else Fused(res[0], res[1], "flash")


def _union(key_sets: torch.Tensor) -> torch.Tensor:
    """The keys some set holds, `[u]`."""
    return key_sets.any(0).any(0).nonzero().flatten()


def _bool_mask(mask: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
    """(ok, the mask as bool): an additive float mask converts only when it holds nothing but 0 and very negative
    values (a real bias — ALiBi, a compressed cache's compensation — does not)."""
    if mask is None or mask.dtype == torch.bool:
        return True, mask
    low = torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | (mask <= low)).all()):
        return False, None
    return True, mask == 0


def _triton_route(q, k, v, *, mask, causal, scale, entropy, key_sets, received, topk, query_mask,
                  strict: bool) -> Fused | None:
    """Output and statistics from the Triton rows pass (+ the columns pass for `received`); None where it does not
    apply (no triton; CPU tensors without TRITON_INTERPRET=1; a per-head mask or a real bias; float64). Unless
    `strict`, a failing kernel warns and returns None, so that the caller's full route runs."""
    ok, bool_mask = _bool_mask(mask)
    if (not ok or (bool_mask is not None and bool_mask.shape[1] != 1) or q.dtype == torch.float64
            or (not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1")):
        return None
    try:
        from .triton import attention_stats_triton
    except ImportError:
        return None
    try:
        out, st = attention_stats_triton(q, k.to(q.dtype), v.to(q.dtype), scale=scale, causal=causal, mask=bool_mask,
                                         query_mask=query_mask, key_sets=key_sets, topk=max(topk, 1),
                                         received=received)
    except Exception as exc:  # noqa: BLE001 — an untested GPU or triton version must not take `stats` down with it
        if strict:
            raise
        warnings.warn(f"the Triton attention-statistics kernel failed ({type(exc).__name__}: {exc}); "
                      "computing the statistics after the layer instead", RuntimeWarning, stacklevel=2)
        return None
    stats = {"lse": st.lse}
    if entropy:
        stats["entropy"] = st.entropy
    if key_sets is not None:
        stats["set_mass"] = st.set_mass
    if topk:
        stats["topk_idx"], stats["topk_weight"] = st.topk_idx, st.topk_weight
    if received:
        stats["received"] = st.received
    return Fused(out.transpose(1, 2), stats, "triton")


def _kernel_route(q, k, v, *, mask, causal, scale, entropy, key_sets, received, topk, query_mask) -> Fused | None:
    """Everything from one sweep of the compiled CPU kernel; None where it is not built or does not apply."""
    from . import cpu

    ok, bool_mask = _bool_mask(mask)
    if q.dtype == torch.float64 or not ok or (causal and k.shape[2] < q.shape[2]) or cpu.load() is None:
        return None
    feats = None
    if key_sets is not None:
        feats = key_sets.to(torch.float32).permute(1, 2, 0).expand(q.shape[0], -1, -1)  # [B, S, K]
    # half-precision inputs are computed in float32 (as ATen's flash kernel accumulates them) and the output rounded
    res = cpu.attention_stats(q.float(), k.float(), v.float(), mask=bool_mask, causal=causal, scale=scale,
                              entropy=entropy, topk=topk, features=feats, received=received, query_mask=query_mask)
    if res is None:
        return None
    out, stats = res
    return Fused(out.to(q.dtype).transpose(1, 2), stats, "kernel")


def _flash_route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, causal: bool,
                 scale: float, entropy: bool, key_sets: torch.Tensor | None, union: torch.Tensor | None,
                 received: bool, query_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The statistics riding on ATen's fused CPU flash kernel.

    One call computes softmax(scale · q kᵀ + mask) V′ with V′ = [V | K | 1_sets] (q and k zero-padded to V′'s
    width, which changes no score), and its row lse:

    - the output is the first D columns;
    - entropy: Σⱼ pᵢⱼ kⱼ comes out of the K columns, and Hᵢ = lseᵢ − scale · qᵢ · Σⱼ pᵢⱼ kⱼ;
    - key-set mass: each indicator column gives Σⱼ∈set pᵢⱼ (sets holding at most SPARSE_SETS keys: from the lse
      and those keys' scores instead).

    `received` (Σᵢ pᵢⱼ over the real queries) needs every row's lse first, so it takes one more flash call with the
    roles swapped: keys as queries over queries as keys, with −lseᵢ / scale carried in one extra dimension (so the
    scores are scale · kⱼ·qᵢ − lseᵢ) and both sequences reversed so that causality stays lower-triangular; that
    call's lse is log receivedⱼ. A padded query gets lse +1e4 there (it gives nothing). None for `received` with
    causal Q ≠ S. `union`: the keys some set holds (`_union(key_sets)`), None without sets.
    """
    n_q, n_s, d = q.shape[2], k.shape[2], q.shape[-1]
    if received and causal and n_q != n_s:
        return None
    if k.shape[1] != q.shape[1]:  # the flash call wants the KV groups expanded to the query heads
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    extra = []
    if entropy:
        extra.append(k)
    if key_sets is not None:
        if union.numel() > SPARSE_SETS:  # large sets: indicator columns in the flash call
            ind = key_sets.to(v.dtype).permute(1, 2, 0)[:, None]  # [B|1, 1, S, K]
            extra.append(ind.expand(v.shape[0], v.shape[1], n_s, key_sets.shape[0]))
            union = None
    wide = torch.cat([v, *extra], -1) if extra else v
    attn_mask = _additive_mask(mask, q.dtype)
    out, lse = _flash(q, k, wide, attn_mask, causal, scale)
    stats: dict[str, torch.Tensor] = {"lse": lse}
    col = d
    if entropy:
        mean_k = out[..., col:col + d].float()
        stats["entropy"] = (lse - scale * (q.float() * mean_k).sum(-1)).clamp_min(0.0)
        col += d
    if key_sets is not None and union is None:
        stats["set_mass"] = out[..., col:].float()
    elif key_sets is not None:  # few keys: their exact weights from the lse, O(Q · u) per head
        stats["set_mass"] = _sparse_set_mass(q, k, lse, key_sets, union, mask, causal, scale)
    if received:
        rows = lse if query_mask is None else lse.masked_fill(~query_mask[:, None, :].to(lse.device), 1e4)
        rows = torch.where(torch.isfinite(rows), rows, torch.full_like(rows, 1e4))  # rows that see nothing
        qq = torch.cat([k.float(), torch.ones_like(k[..., :1], dtype=torch.float32)], -1).to(q.dtype)  # keys ask
        kk = torch.cat([q.float(), (-rows / scale)[..., None]], -1).to(q.dtype)  # queries answer, −lse carried
        swapped = None if mask is None else _additive_mask(mask, q.dtype).transpose(-1, -2)
        if causal or swapped is not None:  # reverse both sequences: i >= j becomes i' <= j'
            qq, kk = qq.flip(2), kk.flip(2)
            swapped = None if swapped is None else swapped.flip(-1).flip(-2)
        _, back = _flash(qq, kk, torch.zeros_like(qq), swapped, causal, scale)
        if causal or swapped is not None:
            back = back.flip(-1)
        stats["received"] = back.exp().nan_to_num(0.0)
    return out[..., :d].contiguous() if extra else out, stats
