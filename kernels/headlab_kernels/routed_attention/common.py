"""What every routed-attention path shares: the checking of inputs and the dtype of the math.

Vocabulary: B batch, H query heads, G key/value groups (grouped-query attention: query head h reads
group h // (H // G)), T tokens (queries and keys alike: causal self-attention), D head dim.
Layouts: q `[B, H, T, D]`, k and v `[B, G, T, D]`, gates `[B, T, H]`, key_mask `[B, T]`, and the
output `[B, T, H, D]` (the layout transformers' attention functions return).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Checked:
    """Checked inputs: sizes, the softmax scale, the math dtype, and gates / key_mask in usable forms.

    Attributes:
        B, H, G, T, D: the sizes (H % G == 0).
        scale: the softmax scale (D ** -0.5 unless given).
        dtype: the dtype of the math and of the output: float64 when q is float64, else float32.
        gates: `[B, T, H]`, floating point (a bool gate tensor becomes 0 / 1 in `dtype`).
        key_mask: bool `[B, T]` or None (True = real key).
    """

    B: int
    H: int
    G: int
    T: int
    D: int
    scale: float
    dtype: torch.dtype
    gates: torch.Tensor
    key_mask: torch.Tensor | None

    @property
    def heads_per_group(self) -> int:
        return self.H // self.G


def math_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 queries, float32 for everything else (bf16 / fp16 inputs are upcast)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                 scale: float | None, key_mask: torch.Tensor | None) -> Checked:
    """Validate q `[B, H, T, D]`, k / v `[B, G, T, D]`, gates `[B, T, H]`, key_mask `[B, T]`; raise ValueError.

    Every error names the argument and the shape it should have. Gates must be finite (checking reads
    them back from the device once).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("gates", gates)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x, want in (("q", q, "[B, H, T, D]"), ("k", k, "[B, G, T, D]"), ("v", v, "[B, G, T, D]")):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D {want}; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")
    devices = {name: x.device for name, x in (("q", q), ("k", k), ("v", v), ("gates", gates),
                                               ("key_mask", key_mask)) if isinstance(x, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"q, k, v, gates (and key_mask) must be on one device; got {where}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: k must be [B, G, T, D] = "
                         f"[{B}, G, {T}, {D}] (same batch, length and head dim)")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)} ([B, G, T, D]); got {tuple(v.shape)}")
    G = k.shape[1]
    if G == 0 or H % G != 0:
        raise ValueError(f"the number of query heads H={H} is not a multiple of the number of key/value groups G={G}")
    if gates.dim() != 3 or tuple(gates.shape) != (B, T, H):
        raise ValueError(f"gates must be [B, T, H] = [{B}, {T}, {H}]; got shape {tuple(gates.shape)}")
    dtype = math_dtype(q)
    if gates.dtype == torch.bool:
        gates = gates.to(dtype)
    elif not gates.is_floating_point():
        raise ValueError(f"gates must be a floating-point (or bool) tensor [B, T, H]; got {gates.dtype}")
    if gates.numel() and not bool(torch.isfinite(gates).all()):
        bad = int((~torch.isfinite(gates)).sum())
        raise ValueError(f"gates must be finite: {bad} of {gates.numel()} values are NaN or infinite")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise ValueError(f"key_mask must be a bool tensor [B, T]; got {type(key_mask).__name__}")
        if key_mask.is_floating_point() or key_mask.is_complex():
            raise ValueError(f"key_mask must be a bool tensor [B, T] (True = real key); got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, T):
            raise ValueError(f"key_mask must be [B, T] = [{B}, {T}]; got shape {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.bool)
    if scale is None:
        scale = D ** -0.5 if D else 1.0
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number; got {scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return Checked(B=B, H=H, G=G, T=T, D=D, scale=scale, dtype=dtype, gates=gates, key_mask=key_mask)
