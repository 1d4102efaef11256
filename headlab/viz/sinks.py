"""Figures of the attention-sink analysis and ACT calibration: data in (a HeadScores, accuracy tables), figure out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from headlab.heads import HeadRef
from headlab.viz.figures import token_ticks

if TYPE_CHECKING:
    from headlab.results import HeadScores


def column_figure(scores: "HeadScores", head: HeadRef, *, index: int = 0, title: str | None = None) -> go.Figure:
    """Bar chart of one head's per-token column scores on prompt `index`; sinks in red, the threshold dashed.

    Args:
        scores: a sink scan's HeadScores (items column_score and sink_mask, meta prompt_tokens, params rule).
        head: the head.
        index: the prompt.
        title: the figure title (default: names the head, model and prompt).

    Returns:
        A plotly Figure.
    """
    col = scores.items["column_score"][index, head.layer, head.head]  # [S]
    sinks = scores.items["sink_mask"][index, head.layer, head.head].bool()
    tokens = scores.meta["prompt_tokens"][index]
    ticks, labels = token_ticks(tokens)
    values = col[: len(tokens)].nan_to_num(0.0).tolist()
    colors = ["crimson" if bool(s) else "steelblue" for s in sinks[: len(tokens)]]
    fig = go.Figure(go.Bar(x=ticks, y=values, marker_color=colors, customdata=labels,
                           hovertemplate="%{customdata}: %{y:.3f}<extra></extra>"))
    rule = scores.params["rule"]
    cut = rule["tau"] if rule["threshold"] == "absolute" else rule["alpha"] / len(tokens)
    fig.add_hline(y=cut, line_dash="dash", line_color="grey")
    fig.update_layout(title=title or f"{head} column scores — {scores.model} (prompt {index}; sinks red; tail 0)",
                      xaxis={"tickmode": "array", "tickvals": ticks[::max(1, len(ticks) // 60)],
                             "ticktext": labels[::max(1, len(ticks) // 60)], "tickfont": {"size": 8}},
                      yaxis_title="column score", height=420, width=max(700, 8 * len(ticks)))
    return fig


def accuracy_figure(tables: dict[str, list[dict]], *, title: str = "ACT calibration") -> go.Figure:
    """Grouped bars: accuracy per task before and after calibration (`meta["tables"]`), with Wilson 95% intervals.

    Args:
        tables: {calibration name: rows with keys task, before, after, before_ci, after_ci}.
        title: the figure title.

    Returns:
        A plotly Figure.
    """
    fig = go.Figure()
    first = next(iter(tables.values()))
    series = [("before", "baseline", first)] + [("after", n, rows) for n, rows in tables.items()]
    for key, label, rows in series:
        fig.add_bar(name=label, x=[r["task"] for r in rows], y=[r[key] for r in rows],
                    error_y={"type": "data", "symmetric": False,
                             "array": [r[f"{key}_ci"][1] - r[key] for r in rows],
                             "arrayminus": [r[key] - r[f"{key}_ci"][0] for r in rows]})
    fig.update_layout(barmode="group", yaxis={"title": "accuracy", "range": [0, 1]}, title=title, height=420)
    return fig
