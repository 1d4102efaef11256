"""Plotly figures: pure functions, data in, figure out."""

from headlab.viz.figures import heatmap, pattern, token_ticks
from headlab.viz.kinds import metric_by_model, pattern_grid

__all__ = ["heatmap", "metric_by_model", "pattern", "pattern_grid", "token_ticks"]
