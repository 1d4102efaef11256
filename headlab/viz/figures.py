"""Layer × head heatmaps and per-head pattern plots."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from headlab.heads import HeadRef
from headlab.run import Run


def heatmap(scores: torch.Tensor, *, title: str = "", colorbar: str = "score") -> go.Figure:
    """A layer × head heatmap of a `[L, H]` score map, with `L{l}H{h}` in the hover text."""
    values = scores.detach().float().cpu()
    n_layers, n_heads = values.shape
    text = [[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=values.tolist(), x=list(range(n_heads)), y=list(range(n_layers)), text=text,
        hovertemplate="%{text}: %{z:.3f}<extra></extra>", colorscale="Viridis", colorbar={"title": colorbar},
    ))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer",
                      xaxis={"dtick": 1}, yaxis={"dtick": 1 if n_layers <= 32 else None, "autorange": "reversed"},
                      height=max(320, 18 * n_layers + 120), width=max(420, 36 * n_heads + 200))
    return fig


def token_ticks(tokens: list[str], start: int = 0) -> tuple[list[int], list[str]]:
    """Integer tick positions and `i:token` labels (plotly merges duplicate category labels)."""
    positions = list(range(start, start + len(tokens)))
    return positions, [f"{i}:{t!r}"[:24] for i, t in zip(positions, tokens)]


def pattern(run: Run, head: HeadRef, *, index: int = 0, window: tuple[int, int] | None = None,
            title: str | None = None) -> go.Figure:
    """One head's pattern over the tokens of batch item `index` (queries down, keys across).

    Args:
        window: (start, stop) positions to show on both axes, for long prompts.
    """
    attn = run.pattern(head)[index]  # [Q, S]
    tokens = run.tokens(index)
    n = len(tokens)
    start, stop = window if window is not None else (0, n)
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        raise ValueError(f"empty window {window} for a prompt of {n} tokens")
    sub = attn[start:stop, start:stop].cpu()
    ticks, labels = token_ticks(tokens[start:stop], start)
    fig = go.Figure(go.Heatmap(
        z=sub.tolist(), x=ticks, y=ticks, colorscale="Blues", zmin=0.0, zmax=1.0,
        customdata=[[[labels[i], labels[j]] for j in range(len(ticks))] for i in range(len(ticks))],
        hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>weight %{z:.3f}<extra></extra>",
    ))
    axis = {"tickmode": "array", "tickvals": ticks, "ticktext": labels, "tickfont": {"size": 9}}
    fig.update_layout(
        title=title or f"{head} pattern — {run.model.name}", xaxis={**axis, "title": "key", "side": "top"},
        yaxis={**axis, "title": "query", "autorange": "reversed"},
        height=max(400, 14 * len(ticks) + 160), width=max(460, 14 * len(ticks) + 220),
    )
    return fig
