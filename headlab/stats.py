"""Long-context head statistics: per-query and per-key summaries of every pattern, never the T×T matrix.

`HeadModel.stats(...)` runs the model once and, layer by layer as the forward reaches it,
reduces q and k to `kernels.head_stats.HeadStats` (top-k keys, log-sum-exp, entropy,
key-set mass, attention received per key) and drops them. `pair_weights` turns a layer's
log-sum-exp into the exact weight of chosen (query, key) pairs in O(pairs · D).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch

from headlab.capture import LayerRecord
from headlab.heads import HeadRef
from headlab.run import Batch
from kernels.head_stats import HeadStats, head_stats

if TYPE_CHECKING:
    from headlab.models.head_model import HeadModel

Impl = Literal["auto", "triton", "reference"]


@dataclass
class StatsRun:
    """One forward with per-layer streaming statistics.

    Attributes:
        model: the HeadModel that ran.
        batch: the token batch.
        output: the HF output (logits for a causal LM).
        layers: per reduced layer, its HeadStats (`[B, H, ...]`, all query heads of the layer).
        extra: per layer, what a custom reducer returned (see `layer_stats`).
    """

    model: "HeadModel"
    batch: Batch
    output: Any
    layers: dict[int, HeadStats]
    extra: dict[int, Any] = field(default_factory=dict)

    def head(self, ref: HeadRef) -> dict[str, torch.Tensor]:
        """One head's statistics, with the head axis removed."""
        self.model.check_heads([ref])
        if ref.layer not in self.layers:
            raise KeyError(f"layer {ref.layer} was not reduced in this run; reduced: {sorted(self.layers)}")
        st = self.layers[ref.layer]
        return {"topk_idx": st.topk_idx[:, ref.head], "topk_weight": st.topk_weight[:, ref.head],
                "lse": st.lse[:, ref.head], "entropy": st.entropy[:, ref.head],
                "set_mass": st.set_mass[:, ref.head], "received": st.received[:, ref.head],
                "n_visible": st.n_visible}


def layer_stats(model: "HeadModel", record: LayerRecord, batch: Batch, *, topk: int = 1,
                key_sets: torch.Tensor | Mapping[str, torch.Tensor] | None = None, impl: Impl = "auto") -> HeadStats:
    """HeadStats of one captured layer, masking padding and causality from the batch.

    The model's own 4-D mask is used only where it says more than causal + padding (a sliding
    window); otherwise nothing of size T×S is read.
    """
    key_mask = batch.attention_mask.bool()
    q_len, k_len = record.q.shape[2], record.k.shape[2]
    mask = None
    if getattr(model.hf.config, "sliding_window", None) and record.mask is not None:
        mask = record.visible()
    return head_stats(record.q, record.k, scale=record.scale, causal=record.causal, mask=mask,
                      key_mask=key_mask[:, -k_len:], query_mask=key_mask[:, -q_len:] if q_len <= k_len else None,
                      key_sets=key_sets, topk=topk, impl=impl)


def pair_weights(record: LayerRecord, lse: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Exact attention weights `[B, H, P]` of P (query, key) position pairs, from the row log-sum-exp.

    Args:
        record: the layer's q `[B, H, Q, D]` and k `[B, G, S, D]`.
        lse: `[B, H, Q]` from HeadStats.
        q_pos, k_pos: `[P]` query and key positions; pairs the query may not see get 0.
    """
    n_heads, n_groups = record.q.shape[1], record.k.shape[1]
    q = record.q[:, :, q_pos].float()  # [B, H, P, D]
    k = record.k[:, :, k_pos].float().repeat_interleave(n_heads // n_groups, dim=1)  # [B, H, P, D]
    logits = (q * k).sum(-1) * record.scale - lse[:, :, q_pos]
    weights = logits.exp()
    ok = record.visible_pairs(q_pos, k_pos)  # [B|1, P]
    return torch.where(ok[:, None, :], weights, torch.zeros_like(weights)).nan_to_num(0.0)
