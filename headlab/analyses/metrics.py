"""Per-head pattern metrics shared by the analyses: row entropy, rank correlations, effective rank.

Plain tensor functions (no model): `analyses.kinds` compares heads across attention kinds with them, the prompt scores
report `row_entropy`, the pruning rankers compare rankings with `spearman`.
"""

from __future__ import annotations

import torch


def effective_rank(matrices: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    """Effective rank of each matrix `[..., M, N]` → `[...]` (float): the fewest singular values holding `energy`
    of Σ σ²; 0 for an all-zero matrix."""
    return rank_of_spectrum(torch.linalg.svdvals(matrices.double()), energy)


def rank_of_spectrum(singular_values: torch.Tensor, energy: float = 0.99) -> torch.Tensor:
    """`effective_rank` from singular values `[..., K]` (any order of magnitude; NaN entries count as 0)."""
    s2 = singular_values.double().nan_to_num(0.0) ** 2
    s2 = s2.sort(-1, descending=True).values
    total = s2.sum(-1, keepdim=True)
    cum = s2.cumsum(-1) / total.clamp_min(1e-300)
    # tolerance: a spectrum holding exactly `energy` in r values counts r, not r + 1
    rank = (cum < energy - 1e-9).sum(-1) + 1
    return torch.where(total[..., 0] > 0, rank, torch.zeros_like(rank)).float()


def row_entropy(pattern: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's |weights| over its visible keys, normalised to sum 1: `[..., Q, S]` → `[..., Q]`
    (NaN for a row with no weight)."""
    mag = pattern.abs() * visible
    total = mag.sum(-1, keepdim=True)
    w = mag / total.clamp_min(1e-30)
    h = -(w * w.clamp_min(1e-30).log()).sum(-1)
    return torch.where(total[..., 0] > 0, h, torch.full_like(h, float("nan")))


def _avg_ranks(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) of each row's visible entries, 0-based; invisible entries get junk."""
    x = x.masked_fill(~visible, float("inf"))
    ordered = x.sort(-1).values.contiguous()
    lo = torch.searchsorted(ordered, x.contiguous(), right=False)
    hi = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (lo + hi - 1).to(torch.float64) / 2


def row_spearman(a: torch.Tensor, b: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of `a` and `b` `[..., Q, S]` over the visible keys → `[..., Q]`
    (NaN where a row has fewer than 2 visible keys or either side is constant)."""
    visible = visible.expand_as(a)
    ra, rb = _avg_ranks(a.float(), visible), _avg_ranks(b.float(), visible)
    n = visible.sum(-1, keepdim=True).to(torch.float64)
    ra = torch.where(visible, ra - (ra * visible).sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    rb = torch.where(visible, rb - (rb * visible).sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    cov = (ra * rb).sum(-1)
    var = (ra * ra).sum(-1) * (rb * rb).sum(-1)
    ok = (var > 1e-12) & (n[..., 0] >= 2)
    return torch.where(ok, cov / var.clamp_min(1e-300).sqrt(), torch.full_like(cov, float("nan"))).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two same-shaped tensors, all entries (average ranks for ties).

    Args:
        a: any tensor.
        b: a tensor of a's shape.

    Returns:
        The correlation in [-1, 1] of the flattened tensors.
    """
    a, b = a.flatten()[None], b.flatten()[None]
    return float(row_spearman(a, b, torch.ones_like(a, dtype=torch.bool))[0])
