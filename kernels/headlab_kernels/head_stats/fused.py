"""Attention output and row log-sum-exp from one fused call: the statistic that rides on the pass the model makes.

On the CPU, `torch.nn.functional.scaled_dot_product_attention` runs ATen's flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`), which computes each row's log-sum-exp anyway and returns it beside
the output. Calling that kernel directly gives the model's output (the same kernel, so the same numbers) and the lse
of every head at no extra cost — no second sweep over the query–key pairs. `attention_with_lse` returns None where
this route does not apply (CUDA tensors, dropout, unequal q/v head sizes, an unsupported dtype); callers then fall
back to the backend plus `head_stats`.
"""

from __future__ import annotations

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
    attn_mask = None
    if mask is not None:
        if causal:
            return None
        attn_mask = mask
        if mask.dtype == torch.bool:
            attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        else:
            attn_mask = mask.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, bool(causal),
                                                                          attn_mask=attn_mask, scale=scale)
    return out, lse.float()
