"""The Heads tab's token view: the shown head (or its whole layer) on the analysed prompt, as HTML for a gr.HTML.

Dense (the exact patterns, to 4 decimals) while the payload fits `ExplorerSettings.token_view_bytes`; past that the
statistics view (per-token entropy, received attention, each query's top-k keys), computed from the layer's cached
q and k, so a 2048-token prompt never sends a 2048² matrix per head to the browser. The app loads the renderer once
(`ON_LOAD_JS`, the gr.HTML's `js_on_load`: a gr.HTML does not run `<script>` tags in its value) and redraws on every
new value; a click on a head's card in the layer view shows that head.
"""

from __future__ import annotations

from headlab.heads import HeadRef
from headlab.run import Run
from headlab.viz.html import RENDERER_JS, ViewError, estimate_dense_bytes

SCOPES = ("head", "layer")
TOPK = 8  # top keys per query in the statistics view

ON_LOAD_JS = RENDERER_JS + """
const draw = () => window.__headlabView.renderAll(element);
draw();
watch('value', draw);
new MutationObserver(draw).observe(element, {childList: true, subtree: true, attributes: true,
                                             attributeFilter: ['data-headlab']});
element.addEventListener('headlab-head', (event) => {  // a head's card clicked in the layer view: show that head
  const box = document.querySelector('#head-box textarea, #head-box input');
  if (!box || !event.detail) return;
  box.value = event.detail.head;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  setTimeout(() => document.querySelector('#show-head')?.click(), 100);
});
"""


def token_view_html(ex, session, head_text: str, scope: str = "head") -> str:
    """The token view's markup for the Heads tab: `head_text`'s head alone (scope "head") or every head of its layer
    (scope "layer", the head focused), dense or statistics by size (see the module)."""
    from headlab.explore.core import _require

    _require(session)
    if scope not in SCOPES:
        raise ViewError(f"token view scope must be one of {SCOPES}, got {scope!r}")
    model = ex.cache.get(session.model)
    head = HeadRef.parse(head_text or "")
    model.check_heads([head])
    refs = [head] if scope == "head" else [HeadRef(head.layer, h) for h in range(model.n_heads)]
    records = ex.records.get((model.owner, session.ids))
    if records is None or head.layer not in records:
        run = model.run(list(session.ids), layers=[head.layer])
    else:
        run = Run(model=model, batch=model.encode(list(session.ids)), output=None, records=records, heads=refs)
    budget = ex.settings.token_view_bytes
    n = session.n_tokens
    dense = estimate_dense_bytes(len(refs), n, n) <= budget
    view = run.token_view(heads=refs, mode="auto" if dense else "stats", topk=TOPK, max_bytes=budget)
    note = view.payload["note"]
    if not dense:
        note = (f"statistics view: {len(refs)} head(s) × {n}² weights would be about "
                f"{_size(estimate_dense_bytes(len(refs), n, n))}, over the explorer's {_size(budget)} budget for "
                f"the browser; hover a token for its top-{TOPK} keys")
    return view.with_payload(note=note, focus=refs.index(head)).markup()


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"
