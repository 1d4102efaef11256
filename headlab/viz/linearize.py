"""Linearization figures (plotly, pure functions of data): transfer error against a head type, hybrid curves."""

from __future__ import annotations

from typing import Any, Iterable

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots


def error_vs_type(error: torch.Tensor, score: torch.Tensor, *, type_name: str, error_name: str = "rel_error",
                  title: str = "") -> go.Figure:
    """One point per head: its transfer error `[L, H]` against a head-type score `[L, H]` (log-scaled error).

    Args:
        error: `[L, H]` per-head transfer error (y axis, log scale).
        score: `[L, H]` head-type score (x axis), e.g. induction.
        type_name: the x-axis label (the score's name).
        error_name: the y-axis label.
        title: the figure title.

    Returns:
        A plotly Figure, points coloured by layer.

    Raises:
        ValueError: error and score not both `[L, H]` of one shape.
    """
    error, score = torch.as_tensor(error, dtype=torch.float32), torch.as_tensor(score, dtype=torch.float32)
    if error.shape != score.shape or error.dim() != 2:
        raise ValueError(f"error {tuple(error.shape)} and score {tuple(score.shape)} must both be [L, H]")
    n_heads = error.shape[1]
    labels = [f"L{i // n_heads}H{i % n_heads}" for i in range(error.numel())]
    fig = go.Figure(go.Scatter(x=score.flatten().tolist(), y=error.flatten().tolist(), mode="markers", text=labels,
                               marker=dict(color=[i // n_heads for i in range(error.numel())], colorscale="Viridis",
                                           colorbar=dict(title="layer"), size=7),
                               hovertemplate=f"%{{text}}<br>{type_name} %{{x:.3f}}<br>{error_name} %{{y:.4f}}"
                                             "<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=type_name, yaxis_title=error_name, yaxis_type="log", width=640,
                      height=440)
    return fig


def hybrid_curve(rows: Iterable[dict[str, Any]], *, title: str = "") -> go.Figure:
    """Perplexity (left axis, log) and needle recall (right axis) against the number of heads kept softmax.

    Args:
        rows: the hybrid sweep's rows: keys "k" (heads kept softmax), "ppl" and, optionally, "recall".
        title: the figure title.

    Returns:
        A plotly Figure with two y axes.
    """
    rows = sorted(rows, key=lambda r: r["k"])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=[r["k"] for r in rows], y=[r["ppl"] for r in rows], mode="lines+markers",
                             name="perplexity"), secondary_y=False)
    if any("recall" in r for r in rows):
        fig.add_trace(go.Scatter(x=[r["k"] for r in rows if "recall" in r], y=[r["recall"] for r in rows if "recall" in r],
                                 mode="lines+markers", name="needle recall"), secondary_y=True)
    fig.update_yaxes(title_text="held-out perplexity", type="log", secondary_y=False)
    fig.update_yaxes(title_text="needle recall", range=[0, 1.05], secondary_y=True)
    fig.update_layout(title=title, xaxis_title="heads kept softmax (hardest to linearize first)", width=720,
                      height=440)
    return fig
