"""Circuit figures (plotly, pure functions): the circuit graph, the task-overlap matrix, shared heads by role, and
patching estimates against exact patching."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import plotly.graph_objects as go

ROLE_COLORS = {
    "mover": "#1f77b4", "negative mover": "#d62728", "induction": "#2ca02c", "previous-token": "#9467bd",
    "duplicate-token": "#8c564b", "inhibition": "#ff7f0e", "other": "#7f7f7f",
}


def _label(head: str) -> tuple[int, int]:
    layer, head_idx = head.removeprefix("L").split("H")
    return int(layer), int(head_idx)


def circuit_graph(heads: Sequence[dict[str, Any]], edges: Iterable[dict[str, Any]], *, title: str = "",
                  min_edge: float = 0.02, n_heads: int | None = None) -> go.Figure:
    """A circuit as a graph: heads as nodes and path-patching edges as lines.

    Nodes sit at x = head index, y = layer, coloured by role and sized by |effect|; edges are as wide as |effect|,
    dashed when negative.

    Args:
        heads: dicts with "head" ("L3H1"), "effect", "role" (a Circuit's `to_json()["heads"]`).
        edges: dicts with "sender", "receiver", "channel", "effect".
        title: the figure title.
        min_edge: edges with |effect| below this are left out.
        n_heads: the model's heads per layer (for the x range; the largest index shown by default).

    Returns:
        A plotly Figure.
    """
    heads = list(heads)
    pos = {h["head"]: _label(h["head"]) for h in heads}
    fig = go.Figure()
    for e in edges:
        if abs(e["effect"]) < min_edge or e["sender"] not in pos or e["receiver"] not in pos:
            continue
        (ls, hs), (lr, hr) = pos[e["sender"]], pos[e["receiver"]]
        fig.add_trace(go.Scatter(
            x=[hs, hr], y=[ls, lr], mode="lines", showlegend=False, hoverinfo="text",
            text=f"{e['sender']} → {e['receiver']} ({e['channel']}): {e['effect']:+.3f}",
            line={"width": 1 + 12 * min(abs(e["effect"]), 1.0), "dash": "solid" if e["effect"] >= 0 else "dash",
                  "color": {"q": "#17becf", "k": "#bcbd22", "v": "#e377c2"}.get(e["channel"], "#999")},
        ))
    for role in dict.fromkeys(h["role"] for h in heads):
        mine = [h for h in heads if h["role"] == role]
        fig.add_trace(go.Scatter(
            x=[pos[h["head"]][1] for h in mine], y=[pos[h["head"]][0] for h in mine], mode="markers+text",
            name=role, text=[h["head"] for h in mine], textposition="top center",
            marker={"size": [10 + 40 * min(abs(h["effect"]), 1.0) for h in mine],
                    "color": ROLE_COLORS.get(role, "#333"), "line": {"width": 1, "color": "black"}},
            hovertemplate="%{text}<br>effect %{customdata:+.3f}<extra>" + role + "</extra>",
            customdata=[h["effect"] for h in mine],
        ))
    top = n_heads - 1 if n_heads else max((p[1] for p in pos.values()), default=0)
    fig.update_layout(title=title, xaxis={"title": "head", "range": [-0.5, top + 0.5], "dtick": 1},
                      yaxis={"title": "layer", "dtick": 1}, legend_title="role (edge colour: q cyan, k olive, v pink)",
                      width=760, height=620)
    return fig


def overlap_figure(matrix, tasks: Sequence[str], *, title: str = "", measure: str = "IoU") -> go.Figure:
    """A task × task overlap matrix (`[n, n]` tensor or nested list) as an annotated heatmap.

    Args:
        matrix: `[n, n]` values in [0, 1] (`overlap_matrix`).
        tasks: the n task names, in matrix order.
        title: the figure title.
        measure: the colour bar's title.

    Returns:
        A plotly Figure.
    """
    values = matrix.tolist() if hasattr(matrix, "tolist") else [list(r) for r in matrix]
    fig = go.Figure(go.Heatmap(z=values, x=list(tasks), y=list(tasks), zmin=0, zmax=1, colorscale="Blues",
                               colorbar={"title": measure}, text=[[f"{v:.2f}" for v in r] for r in values],
                               texttemplate="%{text}", hovertemplate="%{y} / %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, width=560, height=520, yaxis={"autorange": "reversed"})
    return fig


def shared_roles(rows: Iterable[dict[str, Any]], *, title: str = "") -> go.Figure:
    """Stacked bars: for each task pair, its shared heads counted by role.

    Args:
        rows: dicts with "pair", "role", "count".
        title: the figure title.

    Returns:
        A plotly Figure.
    """
    rows = list(rows)
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig = go.Figure()
    for role in dict.fromkeys(r["role"] for r in rows):
        fig.add_trace(go.Bar(x=pairs, y=[sum(r["count"] for r in rows if r["pair"] == p and r["role"] == role)
                                         for p in pairs], name=role, marker_color=ROLE_COLORS.get(role, "#333")))
    fig.update_layout(barmode="stack", title=title, yaxis_title="shared heads", width=760, height=440)
    return fig


def estimate_scatter(exact, estimates: dict[str, Any], *, title: str = "", labels: Sequence[str] | None = None
                     ) -> go.Figure:
    """Patching estimates (AtP, AtP*) against exact patching, one point per head (flat lists or tensors in).

    Args:
        exact: exact patching effects (a tensor or a flat list).
        estimates: {name: estimates in the same order}.
        title: the figure title.
        labels: per-head hover labels ("L3H1").

    Returns:
        A plotly Figure.
    """
    ex = exact.flatten().tolist() if hasattr(exact, "flatten") else list(exact)
    fig = go.Figure()
    for name, est in estimates.items():
        ys = est.flatten().tolist() if hasattr(est, "flatten") else list(est)
        fig.add_trace(go.Scatter(x=ex, y=ys, mode="markers", name=name, text=list(labels) if labels else None,
                                 hovertemplate="%{text}<br>exact %{x:.3f}<br>estimate %{y:.3f}<extra></extra>"))
    finite = [v for v in ex if v == v]
    lo, hi = (min(finite), max(finite)) if finite else (0, 1)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "gray"}))
    fig.update_layout(title=title, xaxis_title="exact patching effect", yaxis_title="estimate", width=640, height=520)
    return fig
