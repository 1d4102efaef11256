"""Plotly figures: pure functions, data in (tensors, tokens, result objects), figure out — never a model or a run.

`figures`: layer × head heatmaps, one head's pattern (signed colour scale where weights are negative); `kinds`: head
comparisons across attention kinds; `sinks`: column scores and ACT accuracy; `retrieval`: needle grids, masking and
KV-cache curves; `prune`: pruning curves and AtP-vs-ablation; `icl` (import it explicitly: it reads the ICL theory's
closed forms, and `import headlab` loads no ICL code): training curves, KQ/OV over training, error curves. `html`: the
token view and the layer × head grid as self-contained HTML + JS (`HtmlView`: inline in Jupyter, `.save(path)`).
"""

from headlab.viz import html as html  # the HTML views (a subpackage, not the stdlib module)
from headlab.viz.figures import heatmap, pattern, pattern_colors, token_ticks
from headlab.viz.kinds import metric_by_model, pattern_grid
from headlab.viz.prune import atp_scatter, curves
from headlab.viz.retrieval import accuracy_grid, kv_figure, masking_figure
from headlab.viz.sinks import accuracy_figure, column_figure

__all__ = ["accuracy_figure", "accuracy_grid", "atp_scatter", "column_figure", "curves", "heatmap", "kv_figure",
           "masking_figure", "metric_by_model", "pattern", "pattern_colors", "pattern_grid", "token_ticks"]
