"""Prompts as token batches, and the record of one run of a HeadModel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from headlab.capture import LayerRecord
from headlab.heads import HeadRef

if TYPE_CHECKING:
    from headlab.models.head_model import HeadModel


@dataclass
class Batch:
    """Token ids `[B, T]` with `attention_mask` `[B, T]` (1 = real token; padding is on the right)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        """The number of real (unpadded) tokens of each item."""
        return self.attention_mask.sum(-1).tolist()

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on another device."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass
class Run:
    """One forward of a HeadModel with per-layer records of the captured layers.

    Attributes:
        model: the HeadModel that ran.
        batch: the token batch.
        output: the HF model's output (`.logits` `[B, T, V]` for a causal LM).
        records: per captured layer, q/k/v and the mask (see LayerRecord).
        heads: the heads asked for.
    """

    model: "HeadModel"
    batch: Batch
    output: Any
    records: dict[int, LayerRecord]
    heads: list[HeadRef] = field(default_factory=list)

    @property
    def logits(self) -> torch.Tensor | None:
        """`[B, T, V]` logits, or None for an encoder without an LM head."""
        return getattr(self.output, "logits", None)

    def _record(self, head: HeadRef) -> LayerRecord:
        self.model.check_heads([head])
        if head.layer not in self.records:
            raise KeyError(f"layer {head.layer} was not captured in this run; captured: {sorted(self.records)} "
                           f"(pass heads=... or layers=... to HeadModel.run)")
        return self.records[head.layer]

    def pattern(self, head: HeadRef) -> torch.Tensor:
        """Float32 attention pattern `[B, Q, S]` of one head, computed from its q and k."""
        return self._record(head).pattern([head.head])[:, 0]

    def patterns(self, layer: int, heads: list[int] | None = None) -> torch.Tensor:
        """Float32 attention patterns `[B, h, Q, S]` of the given query heads of a captured layer (all when None)."""
        self.model.check_heads([HeadRef(layer, h) for h in (heads or [0])])
        return self._record(HeadRef(layer, 0)).pattern(heads)

    def q(self, head: HeadRef) -> torch.Tensor:
        """Post-RoPE queries `[B, Q, D]` of a head."""
        return self._record(head).q[:, head.head]

    def k(self, head: HeadRef) -> torch.Tensor:
        """Post-RoPE keys `[B, S, D]` of the KV group that the head reads."""
        return self._record(head).k[:, self.model.kv_group(head)]

    def v(self, head: HeadRef) -> torch.Tensor:
        """Values `[B, S, D]` of the KV group that the head reads."""
        return self._record(head).v[:, self.model.kv_group(head)]

    def z(self, head: HeadRef) -> torch.Tensor:
        """The head's output `[B, Q, D]` (its slice of the output-projection input); needs `run(..., with_z=True)`."""
        record = self._record(head)
        if record.z is None:
            raise KeyError("this run did not keep head outputs: pass with_z=True to HeadModel.run")
        return record.z[:, :, head.head]

    def figure(self, head: HeadRef, *, index: int = 0, window: tuple[int, int] | None = None,
               title: str | None = None):
        """`viz.pattern` of one head's pattern on batch item `index` (plotly; signed colour scale where needed)."""
        from headlab.viz.figures import pattern

        return pattern(self.pattern(head)[index], self.tokens(index), window=window,
                       title=title or f"{head} pattern — {self.model.name}")

    def token_view(self, layer: int | None = None, heads: Any = None, *, index: int = 0, mode: str = "auto",
                   topk: int = 8, max_bytes: int | None = None):
        """The token view of batch item `index` as self-contained HTML (`HtmlView`: shows inline in Jupyter,
        `.save(path)` writes a page): hover or click a token for where it attends and what attends to it.

        Args:
            layer: show this layer's heads (all, or `heads` given as indices); heads: HeadRefs / `L1H2` strings.
                Neither: the heads the run was asked for, else every head of the first captured layer.
            mode: "dense" (the exact patterns, weights to 4 decimals), "stats" (per-token entropy, received
                attention and each query's `topk` keys, computed from the run's q and k: no T×T matrix), or "auto"
                (dense when the payload fits `max_bytes`, default `viz.html.DENSE_BYTES`, else stats; the
                statistics view has its own budget, `viz.html.STATS_BYTES`).

        Raises:
            HeadIndexError: a head out of range or of a layer the run did not capture.
            ViewTooLarge: mode "dense" over the budget.
        """
        from headlab.views import run_view

        return run_view(self, layer, heads, index=index, mode=mode, topk=topk, max_bytes=max_bytes)

    def _repr_html_(self) -> str:
        """Jupyter shows a run as its default token view (`token_view()`)."""
        from headlab.views import html_or_message

        return html_or_message(self.token_view)

    def tokens(self, index: int = 0) -> list[str]:
        """Display strings of the (unpadded) tokens of batch item `index`."""
        n = int(self.batch.attention_mask[index].sum())
        return self.model.token_strings(self.batch.input_ids[index, :n].tolist())


