"""Next-token cross-entropy: the one loss every analysis, edit comparison and scan reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position next-token cross-entropy in float32: entry t scores token t+1 from position t.

    Args:
        logits: `[B, T, V]` (or `[T, V]` for one sequence).
        ids: `[B, T]` (or `[T]`) token ids.
        mask: optional `[B, T]` 0/1 attention mask: targets on padding (mask 0) are NaN.

    Returns:
        `[B, T-1]` (or `[T-1]`) losses.
    """
    single = logits.dim() == 2
    if single:
        logits, ids = logits[None], ids[None]
        mask = None if mask is None else mask[None]
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view_as(targets)
    if mask is not None:
        losses = losses.masked_fill(mask[:, 1:] == 0, float("nan"))
    return losses[0] if single else losses
