"""Gathering a run's data for the HTML views (`Run.token_view`, `StatsRun.token_view`): which heads, which batch
item, dense patterns or streaming statistics. The views themselves live in `headlab.viz.html` (data in, HTML out)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Literal

import torch

from headlab.errors import HeadIndexError
from headlab.heads import HeadRef, as_heads

if TYPE_CHECKING:
    from headlab.run import Run
    from headlab.stats import StatsRun

Mode = Literal["auto", "dense", "stats"]
"""A token view's mode: "dense" (exact patterns), "stats" (streaming statistics) or "auto" (dense if it fits)."""


def view_heads(model: Any, layer: int | None, heads: Iterable[Any] | None, default: list[HeadRef],
               available: Iterable[int]) -> list[HeadRef]:
    """The heads a view shows, each checked against the model and the layers the run holds.

    The first that applies: `heads` (HeadRefs / `L1H2` strings, or head indices of `layer`), every head of `layer`,
    `default`, every head of the first available layer.

    Args:
        model: the HeadModel (for `n_heads`, `check_layers` and `check_heads`).
        layer: a layer whose heads to show (all of them, or those `heads` gives as indices), or None.
        heads: HeadRefs / `L1H2` strings, or head indices of `layer`, or None.
        default: the heads to show when neither `heads` nor `layer` is given (a run's requested heads).
        available: the layers the run holds data for.

    Returns:
        The heads to show, in the order given.

    Raises:
        HeadIndexError: head indices without a layer, an empty `heads`, a head or layer out of the model's range, a
            head of a layer the run does not hold, or no layer to show at all (naming what is missing).
    """
    available = sorted(available)
    if heads is not None:
        heads = list(heads)
        if heads and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            if layer is None:
                raise HeadIndexError("head indices need a layer: token_view(layer=3, heads=[0, 2]), or pass "
                                     "HeadRefs / 'L3H0' strings")
            refs = [HeadRef(layer, h) for h in heads]
        else:
            refs = as_heads(heads)
    elif layer is not None:
        model.check_layers([layer])
        refs = [HeadRef(layer, h) for h in range(model.n_heads)]
    elif default:
        refs = list(default)
    elif available:
        refs = [HeadRef(available[0], h) for h in range(model.n_heads)]
    else:
        raise HeadIndexError("this run holds no layer to show: pass heads=... or layers=... to the run")
    if not refs:
        raise HeadIndexError("no heads to show: pass at least one head")
    model.check_heads(refs)
    missing = sorted({r.layer for r in refs} - set(available))
    if missing:
        raise HeadIndexError(f"layer(s) {missing} are not in this run; it holds {available} (pass heads=... or "
                             "layers=... when running)")
    return refs


def _item(batch: Any, index: int) -> int:
    n_items = batch.input_ids.shape[0]
    if not 0 <= index < n_items:
        raise HeadIndexError(f"batch item {index} is out of range: the run has {n_items} item(s)")
    return int(batch.attention_mask[index].sum())


def _title(model: Any, refs: list[HeadRef], n: int, what: str) -> str:
    layers = sorted({r.layer for r in refs})
    which = (f"layer {layers[0]}, {len(refs)} heads" if len(layers) == 1 and len(refs) > 1
             else ", ".join(map(str, refs[:6])) + (" …" if len(refs) > 6 else ""))
    return f"{model.name}: {which} — {what}, {n} tokens"


def run_view(run: "Run", layer: int | None = None, heads: Iterable[Any] | None = None, *, index: int = 0,
             mode: Mode = "auto", topk: int = 8, max_bytes: int | None = None):
    """The token view of a `Run` (what `Run.token_view` returns): dense when it fits, else from statistics.

    Modes "auto" and "dense" build the dense view from the run's patterns when its payload fits the budget; mode
    "stats" (or "auto" over the budget) builds the statistics view from the run's own q and k (`stats.layer_stats`),
    with a note saying why when "auto" fell back to it.

    Args:
        run: the Run (its captured layers hold q and k).
        layer: show this layer's heads (all, or those `heads` gives as indices).
        heads: HeadRefs / `L1H2` strings, or head indices of `layer` (see `view_heads` for the defaults).
        index: the batch item.
        mode: "auto", "dense" or "stats" (`Mode`).
        topk: keys kept per query by the statistics view.
        max_bytes: budget of the dense view's payload (None: `viz.html.DENSE_BYTES`).

    Returns:
        An `HtmlView`: kind "tokens" (dense) or "stats".

    Raises:
        ViewError: an unknown mode.
        HeadIndexError: heads that `view_heads` rejects, or a batch item out of range.
        ViewTooLarge: mode "dense" over `max_bytes`, or a statistics view over `viz.html.STATS_BYTES`.
    """
    from headlab.viz.html import DENSE_BYTES, ViewError, ViewTooLarge, estimate_dense_bytes, token_view

    if mode not in ("auto", "dense", "stats"):
        raise ViewError(f"mode must be 'auto', 'dense' or 'stats', got {mode!r}")
    refs = view_heads(run.model, layer, heads, run.heads, run.records)
    n = _item(run.batch, index)
    tokens = run.tokens(index)
    budget = DENSE_BYTES if max_bytes is None else max_bytes
    fits = estimate_dense_bytes(len(refs), n, n) <= budget
    if mode == "dense" or (mode == "auto" and fits):
        weights = torch.stack([_pattern(run, r, index, n) for r in refs])
        try:
            return token_view(tokens, weights, [str(r) for r in refs], title=_title(run.model, refs, n, "pattern"),
                              max_bytes=budget)
        except ViewTooLarge:
            if mode == "dense":
                raise
    note = (f"statistics view: {len(refs)} head(s) × {n}² weights are over the dense view's budget of "
            f"{budget:,} bytes" if mode == "auto" else "")
    stats = {}
    for layer_index in sorted({r.layer for r in refs}):
        from headlab.stats import layer_stats

        stats[layer_index] = layer_stats(run.model, run.records[layer_index], run.batch, topk=topk)
    return stats_view_of(run.model, stats, refs, tokens, index, n, note=note)  # max_bytes is the dense budget


def _pattern(run: "Run", ref: HeadRef, index: int, n: int) -> torch.Tensor:
    p = run.pattern(ref)[index]  # [Q, S]; padding is on the right
    return p[: n - (p.shape[1] - p.shape[0]), :n] if p.shape[0] < p.shape[1] else p[:n, :n]


def stats_run_view(run: "StatsRun", layer: int | None = None, heads: Iterable[Any] | None = None, *, index: int = 0,
                   max_bytes: int | None = None):
    """The statistics token view of a `StatsRun` (what `StatsRun.token_view` returns).

    Args:
        run: the StatsRun (its per-layer HeadStats need top-k keys and entropy: statistics="all").
        layer: show this layer's heads (all, or those `heads` gives as indices).
        heads: HeadRefs / `L1H2` strings, or head indices of `layer` (see `view_heads` for the defaults).
        index: the batch item.
        max_bytes: budget of the view's payload (None: `viz.html.STATS_BYTES`).

    Returns:
        An `HtmlView` of kind "stats".

    Raises:
        HeadIndexError: heads that `view_heads` rejects, or a batch item out of range.
        ViewError: statistics without top-k keys or entropy.
        ViewTooLarge: a payload over `max_bytes`.
    """
    refs = view_heads(run.model, layer, heads, [], run.layers)
    n = _item(run.batch, index)
    return stats_view_of(run.model, run.layers, refs, run.model.token_strings(run.batch.input_ids[index, :n].tolist()),
                         index, n, max_bytes=max_bytes)


def stats_view_of(model: Any, layers: dict, refs: list[HeadRef], tokens: list[str], index: int, n: int, *,
                  note: str = "", max_bytes: int | None = None):
    """The statistics view of some heads from per-layer HeadStats, for one batch item.

    Args:
        model: the HeadModel (its name goes into the title).
        layers: layer -> HeadStats (`[B, H, T, ...]` fields) holding every layer of `refs`.
        refs: the heads to show.
        tokens: display strings of the item's first `n` tokens.
        index: the batch item.
        n: the item's real (unpadded) length: statistics past it are dropped.
        note: a line shown under the title (e.g. why the statistics view was chosen).
        max_bytes: budget of the view's payload (None: `viz.html.STATS_BYTES`).

    Returns:
        An `HtmlView` of kind "stats" (`viz.html.token_stats_view`).

    Raises:
        ViewError: statistics without top-k keys or entropy, or tokens that do not match `n`.
        ViewTooLarge: a payload over the budget.
    """
    from headlab.viz.html import STATS_BYTES, token_stats_view

    def field(name: str, last: int) -> torch.Tensor:
        out = [getattr(layers[r.layer], name)[index, r.head] for r in refs]
        return torch.stack([t[:n] if last == 1 else t[:n, :] for t in out])

    st = layers[refs[0].layer]
    return token_stats_view(tokens, entropy=field("entropy", 1), received=field("received", 1),
                            n_visible=st.n_visible[index, :n], topk_idx=field("topk_idx", 2),
                            topk_weight=field("topk_weight", 2), labels=[str(r) for r in refs], note=note,
                            title=_title(model, refs, n, f"top-{st.topk_idx.shape[-1]} statistics"),
                            max_bytes=STATS_BYTES if max_bytes is None else max_bytes)


def html_or_message(make) -> str:
    """A view's HTML for `_repr_html_`, or a line saying why there is none (Jupyter shows it, not a traceback).

    Args:
        make: a callable with no arguments that returns an `HtmlView` (e.g. `run.token_view`).

    Returns:
        The view's HTML, or a `<pre>` line with the (escaped) HeadlabError / ValueError that `make` raised.
    """
    import html

    from headlab.errors import HeadlabError

    try:
        return make()._repr_html_()
    except (HeadlabError, ValueError) as err:
        return f"<pre>no token view: {html.escape(str(err))}</pre>"
