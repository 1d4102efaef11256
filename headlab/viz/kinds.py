"""Figures comparing heads across attention kinds (softmax against the linear forms)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from headlab.viz.figures import token_ticks

#: One colour per layer kind, the same in every figure.
KIND_COLOURS = {"softmax": "#1f77b4", "swa": "#17becf", "linear": "#ff7f0e", "hedgehog": "#2ca02c",
                "based": "#9467bd", "gla": "#d62728", "deltanet": "#8c564b"}


def metric_by_model(table: Sequence[dict[str, Any]], metric: str, *, title: str | None = None) -> go.Figure:
    """Per-head values of `metric`, one column per model, points coloured by layer kind (box + every point).

    Args:
        table: rows with model, layer, head, kind and the metric (`KindComparison.table()`); NaN values are left out.
        metric: the metric's key.
        title: the figure title (default: the metric).

    Returns:
        A plotly Figure.
    """
    if not table:
        raise ValueError("empty table: nothing to plot")
    if metric not in table[0]:
        have = [k for k in table[0] if k not in ("model", "layer", "head", "kind")]
        raise KeyError(f"no metric {metric!r} in the table; it has {', '.join(have)}")
    models = list(dict.fromkeys(r["model"] for r in table))
    kinds = list(dict.fromkeys(r["kind"] for r in table))
    fig = go.Figure()
    for kind in kinds:
        rows = [r for r in table if r["kind"] == kind and not math.isnan(float(r[metric]))]
        if not rows:
            continue
        fig.add_trace(go.Box(
            x=[r["model"] for r in rows], y=[float(r[metric]) for r in rows], name=kind,
            text=[f"{r['model']} L{r['layer']}H{r['head']} ({kind})" for r in rows],
            boxpoints="all", jitter=0.4, pointpos=0, marker={"color": KIND_COLOURS.get(kind), "size": 7},
            line={"width": 1}, fillcolor="rgba(0,0,0,0)",
            hovertemplate="%{text}: %{y:.3f}<extra></extra>",
        ))
    fig.update_layout(title=title or f"{metric} per head, by model", boxmode="group",
                      xaxis={"title": "model", "categoryorder": "array", "categoryarray": models},
                      yaxis={"title": metric}, legend={"title": "layer kind"},
                      height=420, width=max(520, 90 * len(models) + 220))
    return fig


def pattern_grid(patterns: dict[str, torch.Tensor], *, tokens: list[str] | None = None,
                 titles: dict[str, str] | None = None, cols: int = 3, title: str = "") -> go.Figure:
    """A grid of one prompt's patterns `[T, T]`, one panel per model (queries down, keys across).

    A pattern with a negative weight (DeltaNet, GLA) gets a diverging scale centred on 0 (±max |A|); the others
    a sequential scale from 0 to their maximum. Each panel has its own colour bar.

    Args:
        patterns: {model key: one head's pattern `[T, T]` on the same prompt}.
        tokens: display strings of the prompt's tokens (`i:token` tick labels); integer positions when None.
        titles: per key, the panel title (default: the key).
        cols: panels per row.
        title: the figure title.

    Returns:
        A plotly Figure.

    Raises:
        ValueError: no patterns.
    """
    if not patterns:
        raise ValueError("no patterns to plot")
    keys = list(patterns)
    cols = max(1, min(cols, len(keys)))
    n_rows = math.ceil(len(keys) / cols)
    titles = titles or {}
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[titles.get(k, k) for k in keys],
                        horizontal_spacing=0.09, vertical_spacing=0.12 if n_rows > 1 else 0.0)
    for i, key in enumerate(keys):
        a = patterns[key].detach().float().cpu()
        n = a.shape[-1]
        if tokens:
            ticks, labels = token_ticks(tokens[:n])
        else:
            ticks, labels = list(range(n)), [str(j) for j in range(n)]
        signed = bool((a < 0).any())
        peak = float(a.abs().max()) or 1.0
        row, col = i // cols + 1, i % cols + 1
        axis_id = "" if i == 0 else str(i + 1)
        domain_x = fig.layout[f"xaxis{axis_id}"].domain
        domain_y = fig.layout[f"yaxis{axis_id}"].domain
        fig.add_trace(go.Heatmap(
            z=a.tolist(), x=ticks, y=ticks, colorscale="RdBu" if signed else "Blues", reversescale=signed,
            zmin=-peak if signed else 0.0, zmax=peak, zmid=0.0 if signed else None,
            customdata=[[[labels[q], labels[k]] for k in range(n)] for q in range(n)],
            hovertemplate=(f"{key}<br>query %{{customdata[0]}}<br>key %{{customdata[1]}}<br>weight %{{z:.4f}}"
                           "<extra></extra>"),
            colorbar={"x": domain_x[1] + 0.005, "y": (domain_y[0] + domain_y[1]) / 2,
                      "len": (domain_y[1] - domain_y[0]) * 0.95, "thickness": 8, "tickfont": {"size": 9}},
        ), row=row, col=col)
        step = max(1, n // 8)
        axis = {"tickmode": "array", "tickvals": ticks[::step], "ticktext": labels[::step], "tickfont": {"size": 8}}
        fig.update_xaxes(**axis, row=row, col=col)
        fig.update_yaxes(**axis, autorange="reversed", row=row, col=col)
    fig.update_layout(title=title, height=330 * n_rows + 80, width=330 * cols + 120)
    return fig


def loss_curves(curves: dict[str, Sequence[Sequence[float]]], *, title: str = "training loss") -> go.Figure:
    """Training loss against step, one line per model, coloured by the attention kind its name names.

    A second model of the same kind is dashed.

    Args:
        curves: model name → (step, loss) pairs (a twin's run.json `curve`).
        title: the figure's title.

    Returns:
        A plotly figure of training loss against step.
    """
    fig = go.Figure()
    seen: dict[str | None, int] = {}
    for name, curve in curves.items():
        kind = next((k for k in KIND_COLOURS if name.endswith(k) or f"-{k}" in name or name.startswith(f"{k}-")),
                    None)
        seen[kind] = seen.get(kind, -1) + 1
        line = {"color": KIND_COLOURS[kind], "dash": ("solid", "dash", "dot")[seen[kind] % 3]} if kind else None
        fig.add_trace(go.Scatter(x=[p[0] for p in curve], y=[p[1] for p in curve], mode="lines", name=name,
                                 line=line))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="training loss", height=440, width=760)
    return fig
