"""Plotly figures: pure functions, data in, figure out."""

from headlab.viz.figures import heatmap, pattern, token_ticks

__all__ = ["heatmap", "pattern", "token_ticks"]
