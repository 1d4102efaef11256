"""What both head-stats implementations share: the result type and the checking of inputs.

Vocabulary: B batch, H (Hq) query heads, Hkv key/value heads (grouped-query attention: query
head h reads kv head h // (Hq // Hkv)), T queries, S keys, D head dim, K key sets, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# Stands in for -inf in the reference's masked scores: exp() of it is 0 and 0 * it is 0 (not NaN).
NEG = -1.0e30


@dataclass
class HeadStats:
    """Per-query, per-key-set and per-key statistics of every head's attention pattern.

    Attributes:
        topk_idx: int64 `[B, H, T, k]`, the k most attended keys, by weight, descending (ties: lower
            key first in the Triton kernel; unspecified in the reference); -1 past the visible keys.
        topk_weight: `[B, H, T, k]`, their attention weights (0 past the visible keys).
        lse: `[B, H, T]`, log-sum-exp of the scaled scores over the visible keys (-inf: none visible).
        entropy: `[B, H, T]`, entropy of each row in nats (0 for a row with no visible key).
        set_mass: `[B, H, T, K]`, attention mass each query puts on each key set (K = 0 without sets).
        received: `[B, H, S]`, attention each key receives, summed over the (real) queries.
        n_visible: `[B, S]`, how many (real) queries may see each key (a count, stored as float32).
        set_names: names of the K key sets when they were given as a dict.
    All float tensors are float32.
    """

    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    set_mass: torch.Tensor
    received: torch.Tensor
    n_visible: torch.Tensor
    set_names: tuple[str, ...] = field(default=())

    def column_score(self, min_visible: int = 1) -> torch.Tensor:
        """ACT's sink column score `[B, H, S]`: mean attention a key receives from the queries that see it.

        Keys seen by fewer than `min_visible` queries get NaN: at the tail of a causal sequence the
        mean runs over too few rows to mean anything (ACT's tail caveat).

        Args:
            min_visible: the fewest queries a key must be visible to (at least 1).

        Returns:
            float32 `[B, H, S]`: received / n_visible, NaN where too few queries see the key.
        """
        nv = self.n_visible[:, None, :]
        return torch.where(nv >= max(min_visible, 1), self.received / nv.clamp_min(1.0),
                           torch.full_like(self.received, float("nan")))


@dataclass
class Inputs:
    """Checked masks and key sets, every mask bool.

    Attributes:
        mask: `[B|1, 1, T, S]` or None.
        key_mask: `[B, S]` or None (True = real key).
        query_mask: `[B, T]` or None (True = real query; a padded query sees nothing).
        sets: `[K, B|1, S]` or None.
        set_names: names of the sets when given as a dict.
    """

    mask: torch.Tensor | None
    key_mask: torch.Tensor | None
    query_mask: torch.Tensor | None
    sets: torch.Tensor | None
    set_names: tuple[str, ...]

    @property
    def n_sets(self) -> int:
        return 0 if self.sets is None else self.sets.shape[0]


def check_inputs(q: torch.Tensor, k: torch.Tensor, *, mask: torch.Tensor | None, key_mask: torch.Tensor | None,
                 query_mask: torch.Tensor | None,
                 key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None, topk: int) -> Inputs:
    """Validate shapes and bring masks and key sets to the forms of `Inputs`.

    An additive float `mask` (0 = attend, very negative = not) is turned into a bool one. Without a
    `query_mask`, a `key_mask` also marks the queries when S >= T: queries are taken to be the last T
    of the S positions (self-attention, possibly after a cache), so query i is real when key i + S - T is.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, D] and [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, head dim, Hq % Hkv)")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    S = k.shape[2]
    if mask is not None:
        if mask.is_floating_point():  # additive: 0 where attended, very negative where not
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask.to(torch.bool)
        if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or mask.shape[2:] != (T, S):
            raise ValueError(f"mask must be [B|1, 1, T, S] = [{B}|1, 1, {T}, {S}]; got {tuple(mask.shape)}")
    if key_mask is not None:
        key_mask = key_mask.to(torch.bool)
        if key_mask.shape != (B, S):
            raise ValueError(f"key_mask must be [B, S] = [{B}, {S}]; got {tuple(key_mask.shape)}")
        if query_mask is None and S >= T:
            query_mask = key_mask[:, S - T:]
    if query_mask is not None:
        query_mask = query_mask.to(torch.bool)
        if query_mask.shape != (B, T):
            raise ValueError(f"query_mask must be [B, T] = [{B}, {T}]; got {tuple(query_mask.shape)}")
    names: tuple[str, ...] = ()
    sets = None
    if key_sets is not None:
        if isinstance(key_sets, Mapping):
            names = tuple(key_sets)
            sets = (torch.stack([torch.as_tensor(key_sets[n], device=k.device).to(torch.bool).expand(B, S)
                                 for n in names]) if names else None)
        else:
            sets = key_sets.to(torch.bool)
            if sets.dim() != 3 or sets.shape[1] not in (1, B) or sets.shape[2] != S:
                raise ValueError(f"key_sets must be [K, B|1, S] = [K, {B}|1, {S}]; got {tuple(sets.shape)}")
            if sets.shape[0] == 0:
                sets = None
    return Inputs(mask=mask, key_mask=key_mask, query_mask=query_mask, sets=sets, set_names=names)
