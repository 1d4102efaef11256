"""What every linear-attention form shares: the checking of inputs, states and row selections, and the
causal masks and key padding of the pattern functions (`_causal`, `_pad_keys`, private to the package).

Vocabulary: B batch, H heads, T length, F feature dim of the (already feature-mapped) q and k,
D value dim. States: the linear and gated forms carry S `[B, H, F, D]` (and the linear form a
normaliser z `[B, H, F]`); the delta rule carries S `[B, H, D, F]` (it maps keys to values).
"""

from __future__ import annotations

import torch


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate q, k `[B, H, T, F]` and v `[B, H, T, D]`; return (B, H, T, F, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, {'D' if name == 'v' else 'F'}]; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")
    if q.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in [B, H, T]")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k feature dims differ: q has F={q.shape[3]}, k has F={k.shape[3]}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match q {tuple(q.shape)} in [B, H, T]")
    B, H, T, F = q.shape
    return B, H, T, F, v.shape[3]


def check_g(g: torch.Tensor, q: torch.Tensor) -> None:
    """g (the per-step log decay of GLA) must have q's shape `[B, H, T, F]`."""
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        raise ValueError("g must be a floating-point tensor [B, H, T, F] of log decays (<= 0)")
    if g.shape != q.shape:
        raise ValueError(f"g shape {tuple(g.shape)} is not q's shape {tuple(q.shape)}: GLA needs one log decay "
                         f"per (batch, head, step, feature)")


def check_beta(beta: torch.Tensor, q: torch.Tensor) -> None:
    """beta (the delta rule's write strength) must be `[B, H, T]`."""
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point():
        raise ValueError("beta must be a floating-point tensor [B, H, T] with values in (0, 1)")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, H, T] = {list(q.shape[:3])}; got shape {tuple(beta.shape)}")


def check_chunk(chunk: int) -> int:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return chunk


def check_state(state: torch.Tensor | None, shape: tuple[int, ...], name: str) -> torch.Tensor | None:
    """An optional initial state of exactly `shape`, as float32 (None stays None)."""
    if state is None:
        return None
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {list(shape)}; got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}; got {tuple(state.shape)}")
    return state.float()


def row_index(rows: slice | None, T: int) -> tuple[torch.Tensor | None, int]:
    """The query rows a pattern function returns: (indices or None for all, how many keys they can see).

    `rows` is a slice over the T queries (any start/stop/step, negative ones as in Python).
    Returns the int64 row indices (None when rows is None) and `hi`, one past the last row: under
    causality no selected row sees a key at or past hi.
    """
    if rows is None:
        return None, T
    if not isinstance(rows, slice):
        raise ValueError(f"rows must be a slice or None; got {type(rows).__name__}")
    idx = torch.arange(T)[rows]
    hi = int(idx.max()) + 1 if idx.numel() else 0
    return idx, hi


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
