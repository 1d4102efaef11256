"""Layer × head heatmaps and per-head pattern plots: data in (tensors, tokens), figure out."""

from __future__ import annotations

import plotly.graph_objects as go
import torch



def heatmap(scores: torch.Tensor, *, title: str = "", colorbar: str = "score") -> go.Figure:
    """A layer × head heatmap of a `[L, H]` score map, with `L{l}H{h}` in the hover text.

    Args:
        scores: `[L, H]` (layers down, heads across).
        title: the figure title.
        colorbar: the colour bar's title.

    Returns:
        A plotly Figure.
    """
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
    """Integer tick positions and `i:token` labels (plotly merges duplicate category labels).

    Args:
        tokens: display strings.
        start: the position of the first token.

    Returns:
        (positions, labels): `start .. start + len(tokens) - 1` and `"i:'token'"` cut to 24 characters.
    """
    positions = list(range(start, start + len(tokens)))
    return positions, [f"{i}:{t!r}"[:24] for i, t in zip(positions, tokens)]


def pattern_colors(attn: torch.Tensor) -> dict:
    """The colour scale for a pattern, from its finite values.

    0..1 blues for softmax-like rows; a diverging scale centred on 0 (symmetric in the largest |weight|) when any
    weight is negative (GLA / DeltaNet patterns are signed and unnormalised); 0..max blues when weights exceed 1.

    Args:
        attn: a pattern (any shape).

    Returns:
        Keyword arguments for `go.Heatmap`: colorscale, zmin, zmax (and reversescale, zmid when signed).
    """
    finite = attn[torch.isfinite(attn)]
    lo = float(finite.min()) if finite.numel() else 0.0
    hi = float(finite.max()) if finite.numel() else 1.0
    if lo < 0:
        bound = max(abs(lo), abs(hi)) or 1.0
        return {"colorscale": "RdBu", "reversescale": True, "zmin": -bound, "zmax": bound, "zmid": 0.0}
    return {"colorscale": "Blues", "zmin": 0.0, "zmax": max(1.0, hi)}


def pattern(attn: torch.Tensor, tokens: list[str], *, window: tuple[int, int] | None = None,
            title: str = "pattern") -> go.Figure:
    """A pattern `[Q, S]` over its tokens (queries down, keys across), with a signed colour scale where needed.

    Args:
        attn: one head's pattern on one sequence (`Run.pattern(head)[i]`; for a whole run use `Run.figure(head)`).
        tokens: display strings of the sequence's tokens (`Run.tokens(i)`), at least Q and S of them.
        window: (start, stop) positions to show on both axes, for long prompts.
        title: the figure title.

    Returns:
        A plotly Figure (a heatmap; signed diverging colours when a weight is negative, see `pattern_colors`).

    Raises:
        ValueError: a pattern that is not 2-D, or an empty window.
    """
    if attn.dim() != 2:
        raise ValueError(f"pattern takes one head's [Q, S] pattern, got shape {tuple(attn.shape)}")
    n = min(len(tokens), attn.shape[0], attn.shape[1])
    start, stop = window if window is not None else (0, n)
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        raise ValueError(f"empty window {window} for a prompt of {n} tokens")
    sub = attn[start:stop, start:stop].detach().float().cpu()
    ticks, labels = token_ticks(tokens[start:stop], start)
    fig = go.Figure(go.Heatmap(
        z=sub.tolist(), x=ticks, y=ticks, **pattern_colors(sub),
        customdata=[[[labels[i], labels[j]] for j in range(len(ticks))] for i in range(len(ticks))],
        hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>weight %{z:.3f}<extra></extra>",
    ))
    axis = {"tickmode": "array", "tickvals": ticks, "ticktext": labels, "tickfont": {"size": 9}}
    fig.update_layout(
        title=title, xaxis={**axis, "title": "key", "side": "top"},
        yaxis={**axis, "title": "query", "autorange": "reversed"},
        height=max(400, 14 * len(ticks) + 160), width=max(460, 14 * len(ticks) + 220),
    )
    return fig
