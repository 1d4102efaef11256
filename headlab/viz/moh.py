"""Mixture-of-head figures (plotly, pure functions of data): per-token routing, conversion curves, type lifts."""

from __future__ import annotations

from typing import Any, Iterable

import plotly.graph_objects as go
import torch


def token_routing(gates: torch.Tensor, tokens: list[str], *, shared: int, title: str = "") -> go.Figure:
    """Heads × tokens grid of one layer's gates `[T, H]` (1 = on); the shared heads are marked.

    Args:
        gates: `[T, H]` gates of one layer on one sequence.
        tokens: the T tokens' display strings.
        shared: the number of shared (always-on) heads, the first ones.
        title: the figure title.

    Returns:
        A plotly Figure.

    Raises:
        ValueError: gates that are not `[T, H]` with T = len(tokens).
    """
    g = torch.as_tensor(gates, dtype=torch.float32)
    if g.dim() != 2 or g.shape[0] != len(tokens):
        raise ValueError(f"gates must be [T, H] with T = {len(tokens)} tokens, got {tuple(g.shape)}")
    heads = [f"H{h}{' (shared)' if h < shared else ''}" for h in range(g.shape[1])]
    ticks = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=g.T.tolist(), x=list(range(len(tokens))), y=heads, zmin=0, zmax=1,
                               colorscale=[[0, "#f4f4f4"], [1, "#2c6fbb"]], showscale=False,
                               customdata=[[t] * 1 for t in ticks],
                               hovertemplate="%{y}<br>token %{x}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(tokens))), ticktext=ticks, tickangle=-60)
    fig.update_layout(title=title, xaxis_title="token", yaxis_title="head", height=160 + 24 * g.shape[1],
                      width=max(480, 18 * len(tokens) + 160), yaxis_autorange="reversed")
    return fig


def conversion_curves(rows: Iterable[dict[str, Any]], *, metric: str = "ppl", title: str = "",
                      x: str = "heads_on") -> go.Figure:
    """One line per method (MoH routers, static pruning by each ranker): a metric against the share of heads on.

    Args:
        rows: conversion rows: keys method, heads_on, routed_on, metrics ({name: value}).
        metric: the metric on the y axis (log scale for "ppl").
        title: the figure title.
        x: "heads_on" (share of query heads on per token) or "routed_on" (share of routed heads on).

    Returns:
        A plotly Figure.
    """
    rows = list(rows)
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method and metric in r["metrics"]), key=lambda r: r[x])
        if not mine:
            continue
        fig.add_trace(go.Scatter(x=[r[x] for r in mine], y=[r["metrics"][metric] for r in mine],
                                 mode="lines+markers", name=method,
                                 hovertemplate=f"{method}<br>{x} %{{x:.3f}}<br>{metric} %{{y:.4g}}<extra></extra>"))
    label = {"heads_on": "share of query heads on per token", "routed_on": "share of routed heads on per token"}[x]
    fig.update_layout(title=title, xaxis_title=label, yaxis_title=metric,
                      yaxis_type="log" if metric == "ppl" else "linear", legend_title="method", width=720,
                      height=440)
    return fig


def type_lifts(by_type: dict[str, Any], *, title: str = "") -> go.Figure:
    """Bars: for each token type, its top routed heads by lift (from `MoHRouting.by_type()`).

    Args:
        by_type: {token type: {"top": [(head, frequency, lift), ...], ...}}.
        title: the figure title.

    Returns:
        A plotly Figure (lift 1 dotted).
    """
    fig = go.Figure()
    for name, entry in by_type.items():
        top = entry.get("top", [])
        if not top:
            continue
        fig.add_trace(go.Bar(x=[f"{name}<br>{h}" for h, _, _ in top], y=[lift for _, _, lift in top], name=name,
                             customdata=[f for _, f, _ in top],
                             hovertemplate="%{x}<br>lift %{y:.2f}<br>on for %{customdata:.0%} of these tokens"
                             "<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(title=title, yaxis_title="lift (frequency in type / overall)", barmode="group", width=900,
                      height=440, legend_title="token type")
    return fig
