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
    """A batch of prompts as token ids and their attention mask (padding on the right).

    Attributes:
        input_ids: int token ids `[B, T]`.
        attention_mask: `[B, T]`, 1 for a real token and 0 for padding (each item's real tokens come first).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        """The number of real (unpadded) tokens of each item."""
        return self.attention_mask.sum(-1).tolist()

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on another device.

        Args:
            device: the target device (`"cuda"`, `torch.device("cpu")`, ...).

        Returns:
            A new Batch whose `input_ids` and `attention_mask` are on `device` (this one is unchanged).
        """
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
        """Float32 attention pattern of one head, computed from its captured q and k.

        Softmax layers: softmax(q·k·scale) over the visible keys; linear-attention layers (GLA, DeltaNet): the
        implicit (signed, unnormalised) matrix the layer applies to v.

        Args:
            head: the query head.

        Returns:
            The pattern `[B, Q, S]` (queries by keys; a key the query does not see is 0).

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured in this run.
        """
        return self._record(head).pattern([head.head])[:, 0]

    def patterns(self, layer: int, heads: list[int] | None = None) -> torch.Tensor:
        """Float32 attention patterns of several query heads of one captured layer.

        Args:
            layer: the layer.
            heads: query-head indices of that layer (None: all its heads).

        Returns:
            The patterns `[B, h, Q, S]`, h = `len(heads)` (or the model's `n_heads`), in the order of `heads`.

        Raises:
            HeadIndexError: a layer or head index out of the model's range.
            KeyError: the layer was not captured in this run.
        """
        self.model.check_heads([HeadRef(layer, h) for h in (heads or [0])])
        return self._record(HeadRef(layer, 0)).pattern(heads)

    def q(self, head: HeadRef) -> torch.Tensor:
        """Post-RoPE queries of a head, as its attention read them.

        Args:
            head: the query head.

        Returns:
            Its queries `[B, Q, D]`.

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured in this run.
        """
        return self._record(head).q[:, head.head]

    def k(self, head: HeadRef) -> torch.Tensor:
        """Post-RoPE keys of the KV group that the head reads (shared by the heads of a group under GQA / MQA).

        Args:
            head: the query head.

        Returns:
            The keys `[B, S, D]` of its KV head (`HeadModel.kv_group(head)`).

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured in this run.
        """
        return self._record(head).k[:, self.model.kv_group(head)]

    def v(self, head: HeadRef) -> torch.Tensor:
        """Values of the KV group that the head reads (shared by the heads of a group under GQA / MQA).

        Args:
            head: the query head.

        Returns:
            The values `[B, S, D]` of its KV head (`HeadModel.kv_group(head)`).

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured in this run.
        """
        return self._record(head).v[:, self.model.kv_group(head)]

    def z(self, head: HeadRef) -> torch.Tensor:
        """The head's output z: its slice of the output projection's input; needs `run(..., with_z=True)`.

        Args:
            head: the query head.

        Returns:
            z `[B, Q, D]`.

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured, or the run did not keep head outputs (`with_z=False`).
        """
        record = self._record(head)
        if record.z is None:
            raise KeyError("this run did not keep head outputs: pass with_z=True to HeadModel.run")
        return record.z[:, :, head.head]

    def figure(self, head: HeadRef, *, index: int = 0, window: tuple[int, int] | None = None,
               title: str | None = None):
        """A plotly heatmap of one head's pattern on one batch item (`viz.pattern`), tokens on both axes.

        Args:
            head: the query head.
            index: the batch item.
            window: (start, stop) token positions to show on both axes, for long prompts (None: all).
            title: the figure title (default: the head and the model's name).

        Returns:
            A plotly Figure of the `[Q, S]` pattern (a signed diverging colour scale where a weight is negative).

        Raises:
            HeadIndexError: a head out of the model's range.
            KeyError: the head's layer was not captured in this run.
            ValueError: an empty window.
        """
        from headlab.viz.figures import pattern

        return pattern(self.pattern(head)[index], self.tokens(index), window=window,
                       title=title or f"{head} pattern — {self.model.name}")

    def token_view(self, layer: int | None = None, heads: Any = None, *, index: int = 0, mode: str = "auto",
                   topk: int = 8, max_bytes: int | None = None):
        """The token view of one batch item as self-contained HTML: where each token attends, what attends to it.

        An `HtmlView` (`headlab.viz.html`): it shows inline in Jupyter and `.save(path)` writes a standalone page.
        Hover or click a token for its row (where it attends) and its column (what attends to it); several heads
        show as small multiples. Without `layer` and `heads`: the heads the run was asked for, else every head of
        the first captured layer.

        Args:
            layer: show this layer's heads: all of them, or those of `heads` when it gives head indices.
            heads: the heads to show: HeadRefs / `L1H2` strings, or head indices of `layer`.
            index: the batch item.
            mode: "dense" (the exact `[Q, S]` patterns, weights to 4 decimals), "stats" (per-token entropy,
                received attention and each query's `topk` keys, computed from the run's q and k: no T×T matrix),
                or "auto" (dense when its payload fits `max_bytes`, else stats).
            topk: keys kept per query by the statistics view.
            max_bytes: budget of the dense view's payload (None: `viz.html.DENSE_BYTES`); the statistics view has
                its own budget, `viz.html.STATS_BYTES`.

        Returns:
            An `HtmlView` ("tokens" for the dense view, "stats" for the statistics view).

        Raises:
            HeadIndexError: a head or layer out of range, a layer the run did not capture, head indices without a
                layer, or a batch item out of range.
            ViewError: an unknown mode.
            ViewTooLarge: mode "dense" over `max_bytes`, or a statistics view over its budget.
        """
        from headlab.views import run_view

        return run_view(self, layer, heads, index=index, mode=mode, topk=topk, max_bytes=max_bytes)

    def _repr_html_(self) -> str:
        """Jupyter shows a run as its default token view (`token_view()`)."""
        from headlab.views import html_or_message

        return html_or_message(self.token_view)

    def tokens(self, index: int = 0) -> list[str]:
        """Display strings of the real (unpadded) tokens of one batch item.

        Args:
            index: the batch item.

        Returns:
            One string per real token (the decoded text of each; `#id` for a model without a tokenizer).
        """
        n = int(self.batch.attention_mask[index].sum())
        return self.model.token_strings(self.batch.input_ids[index, :n].tolist())


