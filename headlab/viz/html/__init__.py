"""headlab's views as self-contained HTML + inline vanilla JS (no CDN, no server): the token view (dense, or from
streaming statistics for long prompts) and the layer × head grid. Each is an `HtmlView`: `_repr_html_` renders it
in a Jupyter cell, `save(path)` writes a standalone page, `markup()` gives the explorer its `<div>`."""

from headlab.viz.html.script import RENDERER_JS
from headlab.viz.html.tokens import (
    DENSE_BYTES, STATS_BYTES, estimate_dense_bytes, grid_view, token_stats_view, token_view,
)
from headlab.viz.html.view import SCALE, HtmlView, ViewError, ViewTooLarge, read_payload

__all__ = ["DENSE_BYTES", "RENDERER_JS", "SCALE", "STATS_BYTES", "HtmlView", "ViewError", "ViewTooLarge",
           "estimate_dense_bytes", "grid_view", "read_payload", "token_stats_view", "token_view"]
