"""The Gradio head explorer: components wired to headlab.explore, where all of its logic lives.

Run it with `headlab explore --model smollm2-135m` (or `python apps/explorer.py --model ...`).
It binds 127.0.0.1, makes no share link and sends no analytics. A session's analysed
prompt lives in a gr.State; edits exist only inside the call that measures them.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it phones home at import otherwise

from functools import partial  # noqa: E402
from typing import Callable  # noqa: E402

import gradio as gr  # noqa: E402

from headlab.errors import HeadlabError  # noqa: E402
from headlab.explore import DEFAULT_MODEL, HOW, MAP_LABELS, Explorer  # noqa: E402
from headlab.explore.icl import icl_open, icl_view  # noqa: E402
from headlab.explore.pruning import apply as prune_apply, prune_view, remeasure as prune_remeasure  # noqa: E402
from headlab.explore.kinds import DEFAULT_TEXT, DEFAULT_TWINS, TWINS, twins_view  # noqa: E402
from headlab.explore.retrieval import needle_steps  # noqa: E402
from headlab.analyses.retrieval import needle_sets  # noqa: E402
from headlab.explore.sinks import SINK_MAPS, calibrate_view, sinks_view  # noqa: E402
from headlab.explore.tokens import ON_LOAD_JS as TOKEN_VIEW_JS, token_view_html  # noqa: E402
from headlab.models.bundled import BUNDLED  # noqa: E402

# Gradio's Plot has no click event: hook plotly's own on the score grid, fill the head box, show the head.
CLICK_JS = """
() => {
  const hook = () => document.querySelectorAll('#score-grid .js-plotly-plot').forEach((plot) => {
    if (plot.__headlabClick || typeof plot.on !== 'function') return;
    plot.__headlabClick = true;
    plot.on('plotly_click', (event) => {
      const point = event.points && event.points[0];
      const box = document.querySelector('#head-box textarea, #head-box input');
      if (!point || !box) return;
      box.value = `L${point.y}H${point.x}`;
      box.dispatchEvent(new Event('input', {bubbles: true}));
      setTimeout(() => document.querySelector('#show-head')?.click(), 100);
    });
  });
  // the Circuit tab's graph: clicking a head's node fills the circuit head box and shows that head
  const hookCircuit = () => document.querySelectorAll('#circuit-graph .js-plotly-plot').forEach((plot) => {
    if (plot.__headlabClick || typeof plot.on !== 'function') return;
    plot.__headlabClick = true;
    plot.on('plotly_click', (event) => {
      const point = (event.points || []).find((p) => /^L\d+H\d+$/.test(p.text || ''));  // a node, not an edge
      const box = document.querySelector('#circuit-head-box textarea, #circuit-head-box input');
      if (!point || !box) return;
      box.value = point.text;
      box.dispatchEvent(new Event('input', {bubbles: true}));
      setTimeout(() => document.querySelector('#circuit-show')?.click(), 100);
    });
  });
  new MutationObserver(() => { hook(); hookCircuit(); }).observe(document.body, {childList: true, subtree: true});
  hook();
  hookCircuit();
}
"""


def guarded_steps(steps: Callable, n_outputs: int) -> Callable:
    """Like `guarded`, for an action that yields its outputs stage by stage (the app shows each; a Cancel button
    stops it between stages)."""
    def call(*args):
        try:
            yield from steps(*args)
        except HeadlabError as err:
            gr.Warning(str(err))
            yield (f"⚠️ {err}",) + (gr.skip(),) * (n_outputs - 1)
    return call


def guarded(action: Callable, n_outputs: int) -> Callable:
    """Run an explorer action; on a HeadlabError warn, set the status (first output) and leave the rest as is."""
    def call(*args):
        try:
            return action(*args)
        except HeadlabError as err:
            gr.Warning(str(err))
            out = (f"⚠️ {err}",) + (gr.skip(),) * (n_outputs - 1)
            return out if n_outputs > 1 else out[0]
    return call


def build_app(explorer: Explorer | None = None, *, model: str = DEFAULT_MODEL, circuit=None,
              reports=None) -> gr.Blocks:
    """The explorer's Blocks for one shared Explorer (settings and model cache); no per-session state outside it.

    `circuit`: a `headlab.circuits.view.CircuitView` for the Circuit tab (the graph, a head's pattern on a task
    prompt, the head patched live), or None. `reports`: a `headlab.explore.reports.ReportLibrary` (the report folders
    served: --report, --reports-root) for the Reports, Pruning and ICL tabs, or None. Each tab is built by its own
    function below (components and events); the analysed prompt (`session`, a gr.State) is what they share."""
    ex = explorer or Explorer()
    with gr.Blocks(title="headlab head explorer", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("# headlab head explorer")
        heads_tab(demo, ex, session, model)
        circuit_tab(demo, circuit)
        moh_tab(ex, session)
        sinks_tab(ex, session)
        retrieval_tab(ex, session)
        kinds_tab(ex)
        reports_tab(demo, reports)
        prune_tab(demo, ex, session, reports)
        icl_tab(demo, reports)
    return demo


def heads_tab(demo: gr.Blocks, ex: Explorer, session: gr.State, model: str) -> dict:
    """The Heads tab: model, prompt, the layer × head score grid, one head's pattern, edits compared live."""
    with gr.Tab("Heads", elem_id="tab-heads"):
        with gr.Row():
            model_box = gr.Dropdown(list(dict.fromkeys([model, *BUNDLED])), value=model, allow_custom_value=True,
                                    label="model: a bundled name or a local HF folder", elem_id="model", scale=3)
            bos = gr.Checkbox(True, label="prepend BOS", scale=1)
        prompt = gr.Textbox(label="prompt", lines=3, elem_id="prompt")
        analyse_btn = gr.Button("Analyse", variant="primary", elem_id="analyse")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=3):
                score_map = gr.Radio([(MAP_LABELS[k], k) for k in MAP_LABELS], value="induction",
                                     label="head score")
                grid = gr.Plot(elem_id="score-grid", show_label=False)
            with gr.Column(scale=2):
                gr.Markdown("### Next-token predictions")
                preds = gr.Markdown(elem_id="predictions")
        with gr.Row():
            head_box = gr.Textbox(label="head (click a grid cell, or type L1H2)", elem_id="head-box")
            start = gr.Number(-1, label="window start (-1: end of prompt)", precision=0, elem_id="start")
            size = gr.Slider(4, 128, value=ex.settings.window, step=1, label="window size")
            show_btn = gr.Button("Show head", elem_id="show-head")
        pattern = gr.Plot(elem_id="pattern", show_label=False)
        head_info = gr.Markdown(elem_id="head-info")
        token_scope = gr.Radio([("this head", "head"), ("its whole layer", "layer")], value="head",
                               label="token view: hover or click a token (long prompts: top-k statistics)",
                               elem_id="token-scope")
        token_view = gr.HTML(elem_id="token-view", js_on_load=TOKEN_VIEW_JS)
        gr.Markdown("### Edit heads and compare")
        with gr.Row():
            edit_heads = gr.Textbox(label="heads to edit (e.g. L1H0, L0H3)", elem_id="edit-heads", scale=2)
            add_btn = gr.Button("+ selected head", elem_id="add-head", scale=1)
            how = gr.Radio(list(HOW), value="zero", label="edit", elem_id="how", scale=2)
            factor = gr.Number(0.5, label="scale factor", elem_id="factor", scale=1)
            apply_btn = gr.Button("Apply edit", variant="primary", elem_id="apply-edit", scale=1)
        comparison = gr.Markdown(elem_id="comparison")
    view = [status, grid, preds, session, head_box, pattern, head_info, comparison]
    settings = [model_box, prompt, bos, score_map, start, size]
    show_head = dict(fn=guarded(ex.head_view, 3), inputs=[session, head_box, start, size],
                     outputs=[status, pattern, head_info])
    opened = dict(fn=guarded(ex.open_model, 9), inputs=settings, outputs=[view[0], prompt, *view[1:]])

    def tokens_after(*args):  # follows the head view, which has already reported any bad input: keep quiet
        try:
            return token_view_html(ex, *args)
        except HeadlabError:
            return gr.skip()

    tokens = dict(inputs=[session, head_box, token_scope], outputs=token_view)
    demo.load(**opened).then(tokens_after, **tokens)
    model_box.change(**opened).then(tokens_after, **tokens)
    gr.on([analyse_btn.click, prompt.submit], guarded(ex.analyse_and_show, 8), inputs=settings,
          outputs=view).then(tokens_after, **tokens)
    gr.on([show_btn.click, head_box.submit, start.submit, size.release], **show_head).then(tokens_after, **tokens)
    token_scope.change(guarded(partial(token_view_html, ex), 1), **tokens)
    score_map.change(guarded(ex.show_map, 2), [session, score_map], [status, grid])
    add_btn.click(guarded(ex.select_head, 2), [edit_heads, head_box], [status, edit_heads])
    gr.on([apply_btn.click, edit_heads.submit], guarded(ex.apply_edit, 2), [session, edit_heads, how, factor],
          [status, comparison])
    return dict(model=model_box, prompt=prompt, status=status, head=head_box)


def circuit_tab(demo: gr.Blocks, circuit) -> None:
    """The Circuit tab: a circuit opened at launch (`--circuit DIR`), its graph, a head on a task prompt, patched."""
    with gr.Tab("Circuit", elem_id="tab-circuit"):
        circuit_summary = gr.Markdown(elem_id="circuit-summary")
        circuit_graph = gr.Plot(elem_id="circuit-graph", show_label=False)
        with gr.Row():
            circuit_head = gr.Dropdown([], label="circuit head", allow_custom_value=True, elem_id="circuit-head")
            circuit_box = gr.Textbox(label="head (click a node, pick one, or type L12H3)",
                                     elem_id="circuit-head-box")
            circuit_index = gr.Number(0, label="task prompt", precision=0, elem_id="circuit-prompt")
            circuit_show = gr.Button("Show head on the prompt", elem_id="circuit-show")
            circuit_patch = gr.Button("Patch it from the corrupted prompt", variant="primary",
                                      elem_id="circuit-patch")
        circuit_prompt = gr.Markdown(elem_id="circuit-prompt-text")
        circuit_pattern = gr.Plot(elem_id="circuit-pattern", show_label=False)
        circuit_result = gr.Markdown(elem_id="circuit-result")
    if circuit is None:
        demo.load(lambda: ("No circuit opened: start the explorer with `headlab explore --circuit DIR` (a folder "
                           "written by `headlab circuit discover`).", gr.skip(), gr.skip()),
                  outputs=[circuit_summary, circuit_graph, circuit_head])
        return
    demo.load(lambda: (circuit.summary_md(), circuit.figure(),
                       gr.update(choices=circuit.head_choices(), value=circuit.head_choices()[0]),
                       circuit.head_choices()[0]),
              outputs=[circuit_summary, circuit_graph, circuit_head, circuit_box])
    circuit_head.input(lambda head: head, circuit_head, circuit_box)

    def show(head_text, index):
        info, fig = circuit.head_pattern(head_text, index)
        return info + "\n\n" + circuit.prompt_md(index), fig

    gr.on([circuit_show.click, circuit_box.submit], guarded(show, 2), [circuit_box, circuit_index],
          [circuit_prompt, circuit_pattern])
    circuit_patch.click(guarded(circuit.patch, 1), [circuit_box, circuit_index], circuit_result)


def moh_tab(ex: Explorer, session: gr.State) -> None:
    """The MoH routing tab: the analysed prompt routed by the query-norm router, the edit toggled on and off."""
    with gr.Tab("MoH routing", elem_id="tab-moh"):
        gr.Markdown("Mixture-of-head routing of the prompt analysed in the Heads tab (MoH's training-free "
                    "query-norm router): which routed heads each token keeps, and what the edit does to the "
                    "predictions.")
        with gr.Row():
            moh_active = gr.Slider(0.1, 1.0, value=0.5, step=0.05, label="share of routed heads kept per token",
                                   elem_id="moh-active")
            moh_layer = gr.Number(0, label="layer", precision=0, elem_id="moh-layer")
            moh_on = gr.Checkbox(True, label="apply the MoH edit to the predictions", elem_id="moh-on")
            moh_btn = gr.Button("Route", variant="primary", elem_id="moh-route")
        moh_status = gr.Markdown(elem_id="moh-status")
        moh_plot = gr.Plot(elem_id="moh-plot", show_label=False)
        moh_info = gr.Markdown(elem_id="moh-info")
    gr.on([moh_btn.click, moh_layer.submit, moh_on.change], guarded(ex.moh_view, 3),
          [session, moh_active, moh_layer, moh_on], [moh_status, moh_plot, moh_info])


def sinks_tab(ex: Explorer, session: gr.State) -> None:
    """The Sinks tab: per-key received attention of the analysed prompt, ACT calibration of chosen heads on/off."""
    with gr.Tab("Sinks", elem_id="tab-sinks"):
        gr.Markdown("Attention sinks of the prompt analysed in the Heads tab (ACT's column scores from the streaming "
                    "statistics: no T×T pattern), and ACT's calibration of chosen heads, measured on the prompt.")
        with gr.Row():
            sink_map = gr.Radio([(v, k) for k, v in SINK_MAPS.items()], value="sink_share", label="head score",
                                elem_id="sink-map")
            sink_head = gr.Textbox(label="head (empty: the first suggested)", elem_id="sink-head")
            sink_tail = gr.Number(8, label="tail rule: queries that must see a key", precision=0,
                                  elem_id="sink-tail")
            sink_btn = gr.Button("Scan sinks", variant="primary", elem_id="sink-scan")
        sink_status = gr.Markdown(elem_id="sink-status")
        with gr.Row():
            sink_grid = gr.Plot(elem_id="sink-grid", show_label=False)
            sink_tokens = gr.Markdown(elem_id="sink-tokens")
        sink_column = gr.Plot(elem_id="sink-column", show_label=False)
        gr.Markdown("### ACT calibration")
        with gr.Row():
            calib_heads = gr.Textbox(label="heads to calibrate (filled with the suggested ones by a scan)",
                                     elem_id="calib-heads", scale=2)
            calib_beta = gr.Number(0.4, label="β: share of the sinks' attention kept", elem_id="calib-beta")
            calib_on = gr.Checkbox(True, label="calibration on", elem_id="calib-on")
            calib_btn = gr.Button("Calibrate", variant="primary", elem_id="calib-apply")
        calib_info = gr.Markdown(elem_id="calib-info")
    gr.on([sink_btn.click, sink_head.submit, sink_map.change], guarded(partial(sinks_view, ex), 5),
          [session, sink_head, sink_map, sink_tail], [sink_status, sink_grid, sink_column, sink_tokens, calib_heads])
    gr.on([calib_btn.click, calib_on.change, calib_heads.submit], guarded(partial(calibrate_view, ex), 2),
          [session, calib_heads, calib_beta, sink_tail, calib_on], [sink_status, calib_info])


def retrieval_tab(ex: Explorer, session: gr.State) -> None:
    """The Retrieval tab: a needle decoded live; top-K vs random-K heads masked; RazorAttention's cache on/off."""
    with gr.Tab("Retrieval", elem_id="tab-retrieval"):
        gr.Markdown("A needle in a KJV haystack, answered by greedy decoding with the model of the Heads tab: "
                    "per-head retrieval scores from the decode, the top-K heads masked (uniform attention) against "
                    "K random heads, and RazorAttention's KV cache (retrieval heads full, the rest sinks + window + a "
                    "compensation token) against the same window on every head.")
        with gr.Row():
            needle = gr.Dropdown([(s.question, i) for i, s in enumerate(needle_sets())], value=0, label="needle",
                                 elem_id="needle")
            needle_len = gr.Slider(128, ex.settings.max_tokens, value=min(512, ex.settings.max_tokens), step=64,
                                   label="haystack tokens", elem_id="needle-length")
            needle_depth = gr.Slider(0, 100, value=50, step=5, label="depth (%)", elem_id="needle-depth")
            needle_k = gr.Number(10, label="K heads masked", precision=0, elem_id="needle-k")
            razor_w = gr.Number(64, label="RazorAttention window", precision=0, elem_id="razor-window")
        with gr.Row():
            needle_btn = gr.Button("Decode", variant="primary", elem_id="needle-run")
            needle_stop = gr.Button("Cancel", elem_id="needle-cancel")
        needle_status = gr.Markdown(elem_id="needle-status")
        needle_grid = gr.Plot(elem_id="needle-grid", show_label=False)
        needle_table = gr.Markdown(elem_id="needle-table")
    run = needle_btn.click(guarded_steps(partial(needle_steps, ex), 3),
                           [session, needle, needle_len, needle_depth, needle_k, razor_w],
                           [needle_status, needle_grid, needle_table])
    needle_stop.click(lambda: "Cancelled.", None, needle_status, cancels=[run])


def kinds_tab(ex: Explorer) -> None:
    """The Linear vs softmax tab: one prompt through two bundled twins, one head side by side, zeroed in both."""
    with gr.Tab("Linear vs softmax", elem_id="tab-kinds"):
        gr.Markdown("Two of the bundled twins (same data and recipe, a different attention kind) read the same "
                    "text; one head's pattern side by side. Linear heads show their implicit pattern (pattern @ v "
                    "equals the output); GLA and DeltaNet weights are signed, on a diverging scale.")
        with gr.Row():
            left = gr.Dropdown(list(TWINS), value=DEFAULT_TWINS[0], label="left twin", elem_id="twin-left")
            right = gr.Dropdown(list(TWINS), value=DEFAULT_TWINS[1], label="right twin", elem_id="twin-right")
            twin_layer = gr.Number(1, label="layer", precision=0, elem_id="twin-layer")
            twin_head = gr.Number(0, label="head", precision=0, elem_id="twin-head")
            twin_zero = gr.Checkbox(False, label="zero the head in both", elem_id="twin-zero")
        twin_text = gr.Textbox(DEFAULT_TEXT, label="text (the twins read bytes)", elem_id="twin-text")
        twin_btn = gr.Button("Compare", variant="primary", elem_id="twin-run")
        twin_status = gr.Markdown(elem_id="twin-status")
        with gr.Row():
            with gr.Column():
                left_plot = gr.Plot(elem_id="twin-left-plot", show_label=False)
                left_info = gr.Markdown(elem_id="twin-left-info")
            with gr.Column():
                right_plot = gr.Plot(elem_id="twin-right-plot", show_label=False)
                right_info = gr.Markdown(elem_id="twin-right-info")
    gr.on([twin_btn.click, twin_text.submit, twin_zero.change], guarded(partial(twins_view, ex), 5),
          [left, right, twin_text, twin_layer, twin_head, twin_zero],
          [twin_status, left_plot, left_info, right_plot, right_info])


NO_REPORTS = "No reports served: start the explorer with `headlab explore --report DIR` (or --reports-root DIR)."


def reports_tab(demo: gr.Blocks, reports) -> None:
    """The Reports tab: a saved report folder (`--report DIR`, or picked among those under `--reports-root`): its
    figures, top heads and settings (`headlab.explore.reports`)."""
    typed = bool(reports is not None and reports.allow_folders)
    with gr.Tab("Reports", elem_id="tab-reports"):
        with gr.Row():
            picker = gr.Dropdown([], label="report folder" + (" (pick one, or type a folder on the server)" if typed
                                                              else ""), allow_custom_value=typed,
                                 elem_id="report-picker", scale=4)
            refresh = gr.Button("Refresh the list", elem_id="report-refresh", scale=1)
            open_btn = gr.Button("Open", variant="primary", elem_id="report-open", scale=1)
        report_status = gr.Markdown(elem_id="report-status")
        figure = gr.Dropdown([], label="figure", elem_id="report-figure")
        plot = gr.Plot(elem_id="report-plot", show_label=False)
        info = gr.Markdown(elem_id="report-info")
    if reports is None:
        demo.load(lambda: NO_REPORTS, outputs=report_status)
        return

    def show(folder, name=None):
        status, md, names, fig = reports.view(folder, name)
        return status, md, gr.update(choices=names, value=name if name in names else (names[0] if names else None)), fig

    def first():
        choices = reports.choices()
        listed = gr.update(choices=choices, value=choices[0][1] if reports.opened and choices else None)
        if not reports.opened:
            return (f"{len(choices)} report folders found under {', '.join(map(str, reports.roots)) or 'no root'}: "
                    "pick one.", gr.skip(), gr.skip(), gr.skip(), listed)
        return (*show(choices[0][1]), listed)

    outputs = [report_status, info, figure, plot]
    demo.load(guarded(first, 5), outputs=[*outputs, picker])
    refresh.click(lambda: gr.update(choices=reports.choices()), outputs=picker)
    gr.on([picker.input, open_btn.click], guarded(show, 4), picker, outputs)
    figure.input(guarded(show, 4), [picker, figure], outputs)


def _runs_of(reports, kind: str):
    """The dropdown update listing the served reports of a kind (the first opened one, else the first, chosen)."""
    choices = reports.of_kind(kind)
    opened = [v for _, v in choices if v in {str(p) for p in reports.opened}]
    return gr.update(choices=choices, value=(opened or [v for _, v in choices] or [None])[0])


def prune_tab(demo: gr.Blocks, ex: Explorer, session: gr.State, reports) -> None:
    """The Pruning tab: a saved `headlab prune` run's curves; a ranker's mask at a fraction applied to the analysed
    prompt (the experiment's own heads, zero-ablated), compared with the original (`headlab.explore.pruning`)."""
    with gr.Tab("Pruning", elem_id="tab-prune"):
        gr.Markdown("A saved pruning run (`headlab prune`): its curves, and a ranker's mask at a fraction applied to "
                    "the prompt analysed in the Heads tab: the very heads the run removes at that fraction, "
                    "zero-ablated, inside the call (the shared model is untouched).")
        with gr.Row():
            run_box = gr.Dropdown([], label="pruning run (opened reports of kind prune)", elem_id="prune-run", scale=4)
            refresh = gr.Button("Refresh the list", elem_id="prune-refresh", scale=1)
        prune_status = gr.Markdown(elem_id="prune-status")
        with gr.Row():
            curves = gr.Plot(elem_id="prune-curves", show_label=False)
            table = gr.Markdown(elem_id="prune-table")
        with gr.Row():
            ranker = gr.Radio([], label="ranker", elem_id="prune-ranker")
            fraction = gr.Slider(0, 1, value=0.25, step=0.01, label="fraction of heads removed",
                                 elem_id="prune-fraction")
            apply_btn = gr.Button("Apply the mask", variant="primary", elem_id="prune-apply")
            again = gr.Button("Re-measure the run's eval", elem_id="prune-remeasure")
        comparison = gr.Markdown(elem_id="prune-comparison")
        remeasured = gr.Markdown(elem_id="prune-remeasured")
    if reports is None:
        demo.load(lambda: NO_REPORTS, outputs=prune_status)
        return

    def show(folder):
        status, fig, rankers, fractions, md = prune_view(reports, folder)
        return (status, fig, gr.update(choices=rankers, value=rankers[0]), gr.update(value=max(fractions)), md)

    def listing():
        update = _runs_of(reports, "prune")
        if not update["value"]:
            return ("No pruning run under the report roots: start the explorer with --report DIR (a `headlab prune` "
                    "folder).", gr.skip(), gr.skip(), gr.skip(), gr.skip(), update)
        return (*show(update["value"]), update)

    view = [prune_status, curves, ranker, fraction, table]
    demo.load(guarded(listing, 6), outputs=[*view, run_box])
    refresh.click(lambda: _runs_of(reports, "prune"), outputs=run_box)
    run_box.input(guarded(show, 5), run_box, view)
    gr.on([apply_btn.click, fraction.release, ranker.input],
          guarded(lambda *a: prune_apply(ex, reports, *a)[:2], 2), [session, run_box, ranker, fraction],
          [prune_status, comparison])
    again.click(guarded(lambda *a: prune_remeasure(ex, reports, *a)[:2], 2), [session, run_box, ranker, fraction],
                [prune_status, remeasured])


def icl_tab(demo: gr.Blocks, reports) -> None:
    """The ICL tab: a saved `headlab icl train` run: KQ and OV at the checkpoint a step slider picks, the loss curves
    (`headlab.explore.icl`)."""
    with gr.Tab("ICL", elem_id="tab-icl"):
        gr.Markdown("A saved in-context regression run (`headlab icl train`): every head's KQ and OV at the saved "
                    "checkpoint nearest the chosen step, and the losses over training.")
        with gr.Row():
            run_box = gr.Dropdown([], label="icl run (opened reports of kind icl)", elem_id="icl-run", scale=4)
            refresh = gr.Button("Refresh the list", elem_id="icl-refresh", scale=1)
        icl_status = gr.Markdown(elem_id="icl-status")
        step = gr.Slider(0, 1, value=1, step=1, label="training step (saved checkpoints)", elem_id="icl-step")
        weights = gr.Plot(elem_id="icl-weights", show_label=False)
        curves = gr.Plot(elem_id="icl-curves", show_label=False)
    if reports is None:
        demo.load(lambda: NO_REPORTS, outputs=icl_status)
        return

    def show(folder):
        status, fig, curve, (lo, hi, spacing), shown = icl_open(reports, folder)
        return status, fig, curve, gr.update(minimum=lo, maximum=hi, step=spacing, value=shown)

    def listing():
        update = _runs_of(reports, "icl")
        if not update["value"]:
            return ("No `icl train` run under the report roots: start the explorer with --report DIR.",
                    gr.skip(), gr.skip(), gr.skip(), update)
        return (*show(update["value"]), update)

    view = [icl_status, weights, curves, step]
    demo.load(guarded(listing, 5), outputs=[*view, run_box])
    refresh.click(lambda: _runs_of(reports, "icl"), outputs=run_box)
    run_box.input(guarded(show, 4), run_box, view)
    def show_step(folder, value):
        status, fig, shown = icl_view(reports, folder, value)
        return status, fig, gr.update(value=shown)  # the slider snaps to the checkpoint shown

    step.release(guarded(show_step, 3), [run_box, step], [icl_status, weights, step])


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve the app locally (no share link, sessions run concurrently); returns its URL when not blocking."""
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                            js=CLICK_JS, ssr_mode=False, mcp_server=False, quiet=not block, footer_links=[])
    return url


if __name__ == "__main__":
    import sys

    from headlab.cli import main

    sys.exit(main(["explore", *sys.argv[1:]]))
