"""Figures of the retrieval-head analysis: data in (trial records, per-condition summaries), figure out."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def accuracy_grid(records: list[dict[str, Any]], condition: str = "baseline") -> go.Figure:
    """Heatmap of mean recall by context length (rows) and needle depth (columns) for one condition.

    Args:
        records: per-trial records (keys condition, length, depth, recall, found).
        condition: the condition to show.

    Returns:
        A plotly Figure.
    """
    recs = [r for r in records if r["condition"] == condition]
    lengths, depths = sorted({r["length"] for r in recs}), sorted({r["depth"] for r in recs})
    z, text = [], []
    for length in lengths:
        cells = [[r for r in recs if r["length"] == length and r["depth"] == d] for d in depths]
        z.append([sum(r["recall"] for r in c) / len(c) if c else None for c in cells])
        text.append([f"{sum(r['found'] for r in c)}/{len(c)} found" for c in cells])
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(depths))), y=list(range(len(lengths))), text=text, zmin=0,
                               zmax=1, colorscale="Viridis", colorbar={"title": "recall"},
                               hovertemplate="%{text}<br>mean recall %{z:.2f}<extra></extra>"))
    fig.update_layout(title=f"needle recall ({condition})", xaxis={"title": "depth (%)", "tickmode": "array",
                      "tickvals": list(range(len(depths))), "ticktext": [f"{d:g}" for d in depths]},
                      yaxis={"title": "context length (tokens)", "tickmode": "array",
                             "tickvals": list(range(len(lengths))), "ticktext": [str(n) for n in lengths]})
    return fig


def masking_figure(summary: dict[str, dict[str, float]], how: str = "uniform") -> go.Figure:
    """Needle recall with the top-K retrieval heads masked against K random heads (mean, min–max over draws).

    Args:
        summary: {condition: {"accuracy", ...}} with conditions "top{K}-{how}", "random{K}-{how}-{draw}" and
            "baseline".
        how: the masking ("uniform", "zero", ...) whose conditions to plot.

    Returns:
        A plotly Figure.
    """
    ks = sorted(int(n[3:].split("-")[0]) for n in summary if n.startswith("top") and n.endswith(how))
    top = [summary[f"top{k}-{how}"]["accuracy"] for k in ks]
    rand = [[v["accuracy"] for n, v in summary.items() if n.startswith(f"random{k}-{how}-")] for k in ks]
    mean = [sum(r) / len(r) if r else None for r in rand]
    fig = go.Figure([go.Scatter(x=ks, y=top, name="top-K retrieval heads masked", mode="lines+markers"),
                     go.Scatter(x=ks, y=mean, name="K random heads masked (mean)", mode="lines+markers",
                                error_y={"type": "data", "symmetric": False,
                                         "array": [max(r) - m if r else 0 for r, m in zip(rand, mean)],
                                         "arrayminus": [m - min(r) if r else 0 for r, m in zip(rand, mean)]})])
    if "baseline" in summary:
        fig.add_hline(y=summary["baseline"]["accuracy"], line_dash="dot", annotation_text="no mask")
    fig.update_layout(title=f"needle recall under {how} masking (decoding only)", xaxis_title="K heads masked",
                      yaxis={"title": "mean ROUGE-1 recall", "range": [0, 1.05]})
    return fig


def kv_figure(summary: dict[str, dict[str, float]]) -> go.Figure:
    """Needle recall against the KV-cache fraction kept: full cache, RazorAttention, window-only controls.

    Args:
        summary: {condition: {"accuracy", "kv_fraction", ...}} (conditions "baseline", "razor-*", "window-*").

    Returns:
        A plotly Figure.
    """
    fig = go.Figure()
    for prefix, label in (("baseline", "full cache"), ("razor-", "RazorAttention"), ("window-", "window only")):
        names = [n for n in summary if n.startswith(prefix)]
        fig.add_trace(go.Scatter(x=[summary[n]["kv_fraction"] for n in names],
                                 y=[summary[n]["accuracy"] for n in names], text=names, mode="markers+text",
                                 textposition="top center", name=label))
    fig.update_layout(title="needle recall against KV cache kept",
                      yaxis={"title": "mean ROUGE-1 recall", "range": [0, 1.1]},
                      xaxis={"title": "KV cache fraction (entries kept / full)", "range": [0, 1.05]})
    return fig
