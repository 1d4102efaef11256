"""Pruning figures (plotly, pure functions): a metric against the fraction of heads removed."""

from __future__ import annotations

from typing import Any, Iterable

import plotly.graph_objects as go


def curves(rows: Iterable[dict[str, Any]], *, title: str = "", log_y: bool | None = None) -> go.Figure:
    """One line per ranker: the rows' primary metric (y) against the fraction of heads removed (x).

    Args:
        rows: result rows of one eval (keys ranker, fraction, value, primary, n_removed).
        title: the figure title.
        log_y: log-scale y (default: for perplexity).

    Returns:
        A plotly Figure.
    """
    rows = list(rows)
    fig = go.Figure()
    for ranker in dict.fromkeys(r["ranker"] for r in rows):
        mine = sorted((r for r in rows if r["ranker"] == ranker), key=lambda r: r["fraction"])
        fig.add_trace(go.Scatter(
            x=[r["fraction"] for r in mine], y=[r["value"] for r in mine], mode="lines+markers", name=ranker,
            customdata=[r["n_removed"] for r in mine],
            hovertemplate=f"{ranker}<br>fraction %{{x:.3f}} (%{{customdata}} heads)<br>%{{y:.4g}}<extra></extra>",
        ))
    metric = rows[0]["primary"] if rows else "metric"
    if log_y is None:
        log_y = metric == "ppl"
    fig.update_layout(title=title, xaxis_title="fraction of heads removed (least important first)",
                      yaxis_title=metric, yaxis_type="log" if log_y else "linear", legend_title="ranker",
                      width=720, height=440)
    return fig


def atp_scatter(atp, ablation, *, title: str = "") -> go.Figure:
    """AtP's estimate against the exhaustive ablation effect, one point per head (HeadScores in).

    Args:
        atp: HeadScores of `atp_scores` (y axis).
        ablation: HeadScores of `ablation_scores` (x axis), same shape.
        title: the figure title.

    Returns:
        A plotly Figure with the y = x diagonal.
    """
    a, b = atp.scores.flatten().tolist(), ablation.scores.flatten().tolist()
    n_heads = atp.scores.shape[1]
    labels = [f"L{i // n_heads}H{i % n_heads}" for i in range(len(a))]
    lo, hi = min(a + b), max(a + b)
    fig = go.Figure([
        go.Scatter(x=b, y=a, mode="markers", text=labels, name="heads",
                   hovertemplate="%{text}<br>ablation %{x:.4f}<br>AtP %{y:.4f}<extra></extra>"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "grey"}, name="y = x"),
    ])
    fig.update_layout(title=title, xaxis_title="loss increase, head zeroed (exhaustive)",
                      yaxis_title="AtP estimate", width=560, height=480)
    return fig
