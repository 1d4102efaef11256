"""The head explorer's logic, free of Gradio (apps/explorer.py only wires it to components).

`core` holds what every tab shares: settings, the model and record caches, the analysed prompt's `Session`, the
Heads tab's actions and the MoH routing tab. Each further tab's logic lives in its own module here and takes the
`Explorer` (for its caches and settings) plus plain values.
"""

from headlab.explore.core import (  # noqa: F401
    DEFAULT_MODEL, HOW, MAP_LABELS, Explorer, ExplorerSettings, ModelCache, RecordCache, Session, _load,
    add_head, comparison_md, example_prompt, load_app_module, make_edits, md_token, parse_heads, parse_prompt,
    predictions_md, top_predictions,
)
