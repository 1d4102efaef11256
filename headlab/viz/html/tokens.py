"""The token view (dense and long-prompt statistics modes) and the layer × head grid, as `HtmlView`s.

Data in, view out: tokens, weights and statistics as tensors; never a model or a run (`Run.token_view`,
`StatsRun.token_view` and `HeadScores.grid_view` gather the data and call these).

Weights are kept exact to 4 decimals: each travels as the integer round(w · 10⁴) (`SCALE`), and each query's row is
cut after its last nonzero (a causal row carries only its visible keys). Statistics (entropy, received mass) are
rounded to 4 decimals.
"""

from __future__ import annotations

import torch

from headlab.viz.html.view import SCALE, HtmlView, ViewError, check_budget, rounded

DENSE_BYTES = 4_000_000   # default budget of a dense view's payload (T x T weights per head)
"""Default budget, in bytes, of a dense token view's payload (`token_view`, `Run.token_view`)."""
STATS_BYTES = 16_000_000  # default budget of a statistics view (per-token values and top-k keys per head)
"""Default budget, in bytes, of a statistics view's payload (`token_stats_view`, `StatsRun.token_view`)."""
BYTES_PER_CELL = 2.5      # bytes per visible (query, key) cell of a typical pattern's payload, for planning
"""Bytes per visible (query, key) cell of a typical dense payload (`estimate_dense_bytes`)."""


def _labels(labels: list[str] | None, n: int) -> list[str]:
    labels = [str(x) for x in labels] if labels is not None else [f"head {i}" for i in range(n)]
    if len(labels) != n:
        raise ViewError(f"{len(labels)} labels for {n} heads")
    return labels


def _tokens(tokens: list[str], n: int, what: str) -> list[str]:
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise ViewError(f"{len(tokens)} tokens for {what} over {n} positions")
    return tokens


def estimate_dense_bytes(n_heads: int, n_queries: int, n_keys: int, *, causal: bool = True) -> int:
    """A rough size of a dense view's payload from its shape alone (`BYTES_PER_CELL` per visible cell).

    For deciding, without building the patterns, whether a dense view is worth trying (a head whose rows end early,
    e.g. a sink head, costs less than this).

    Args:
        n_heads: heads in the view.
        n_queries: query positions Q (the last Q of the S keys).
        n_keys: key positions S.
        causal: count only the keys each query sees under a causal mask; False: every (query, key) cell.

    Returns:
        The estimated payload size in bytes.
    """
    cells = n_heads * (n_queries * (n_queries + 1) // 2 + n_queries * (n_keys - n_queries) if causal
                       else n_queries * n_keys)
    return int(cells * BYTES_PER_CELL)


def token_view(tokens: list[str], weights: torch.Tensor, labels: list[str] | None = None, *, title: str = "",
               note: str = "", max_bytes: int | None = DENSE_BYTES) -> HtmlView:
    """The dense token view: hover or click a token to see where it attends and what attends to it.

    A token's row shows where it attends and its column what attends to it, for one head, or several heads as small
    multiples (a thumbnail of each pattern; click one to focus it). Weights travel exact to 4 decimals, each row cut
    after its last nonzero.

    Args:
        tokens: display strings of the S key positions.
        weights: `[H, Q, S]` patterns, or one head's `[Q, S]` (Q ≤ S: the queries are the last Q positions); signed
            weights (GLA / DeltaNet) get a diverging colour scale (red > 0, blue < 0). NaN is shown as 0.
        labels: a name per head (`L1H2`; default `head 0`, `head 1`, ...); a click on a head's card in the explorer
            selects it.
        title: a title shown above the view.
        note: a line shown under the title.
        max_bytes: budget of the payload (None: no limit); over it, ViewTooLarge (use `token_stats_view`).

    Returns:
        An `HtmlView` of kind "tokens".

    Raises:
        ViewError: weights that are not `[H, Q, S]` / `[Q, S]`, more queries than keys, or tokens / labels whose
            number does not match.
        ViewTooLarge: a payload over `max_bytes`.
    """
    if weights.dim() == 2:
        weights = weights[None]
    if weights.dim() != 3:
        raise ViewError(f"token_view takes weights [H, Q, S] (or one head's [Q, S]), got {tuple(weights.shape)}")
    n_heads, n_q, n_s = weights.shape
    if n_q > n_s:
        raise ViewError(f"more queries ({n_q}) than keys ({n_s})")
    tokens, labels = _tokens(tokens, n_s, "weights"), _labels(labels, n_heads)
    what = f"a dense token view of {n_heads} head(s) × {n_q}×{n_s} positions"
    advice = "show fewer heads or use the statistics view (StatsRun.token_view, or mode='stats')"
    w = weights.detach().float().cpu().nan_to_num(0.0)
    ints = torch.round(w * SCALE).to(torch.int64)
    nonzero = ints != 0
    length = torch.where(nonzero.any(-1), n_s - nonzero.flip(-1).int().argmax(-1), 0)  # [H, Q]: up to the last nonzero
    check_budget(2 * int(length.sum()), max_bytes, what, advice)  # each kept weight costs 2+ bytes: refuse early
    rows = [[ints[h, q, : int(length[h, q])].tolist() for q in range(n_q)] for h in range(n_heads)]
    signed = bool((w < 0).any())
    view = HtmlView({"kind": "tokens", "title": title, "note": note, "tokens": tokens, "labels": labels,
                     "scale": SCALE, "q_offset": n_s - n_q, "signed": signed, "rows": rows},
                    summary=f"token view: {n_s} tokens, {n_heads} head(s)")
    check_budget(view.nbytes, max_bytes, what, advice)
    return view


def token_stats_view(tokens: list[str], *, entropy: torch.Tensor, received: torch.Tensor, n_visible: torch.Tensor,
                     topk_idx: torch.Tensor, topk_weight: torch.Tensor, labels: list[str] | None = None,
                     title: str = "", note: str = "", max_bytes: int | None = STATS_BYTES) -> HtmlView:
    """The token view of a long prompt from streaming statistics, with no T×T matrix.

    Tokens are coloured by each row's entropy, the attention each key receives, or its column score (received /
    queries that see it); hover a token for its top-k keys (exact weights) and the queries that hold it among their
    top-k. The arguments are the `HeadStats` fields of one batch item (`headlab_kernels.head_stats`).

    Args:
        tokens: display strings of the T positions.
        entropy: `[H, T]`, each query row's entropy in nats.
        received: `[H, T]`, the attention each key receives, summed over the queries.
        n_visible: `[T]`, how many queries see each key.
        topk_idx: int `[H, T, k]`, each query's most attended keys (-1: no key).
        topk_weight: `[H, T, k]`, their weights (signed for GLA / DeltaNet).
        labels: a name per head (`L1H2`; default `head 0`, `head 1`, ...).
        title: a title shown above the view.
        note: a line shown under the title.
        max_bytes: budget of the payload (None: no limit); over it, ViewTooLarge.

    Returns:
        An `HtmlView` of kind "stats".

    Raises:
        ViewError: statistics whose shapes disagree, statistics without top-k keys or entropy (an lse-only
            StatsRun), or tokens / labels whose number does not match.
        ViewTooLarge: a payload over `max_bytes`.
    """
    if entropy.dim() != 2 or topk_idx.dim() != 3 or topk_idx.shape != topk_weight.shape:
        raise ViewError(f"token_stats_view takes entropy [H, T] and top-k [H, T, k]; got {tuple(entropy.shape)}, "
                         f"{tuple(topk_idx.shape)}, {tuple(topk_weight.shape)}")
    n_heads, n = entropy.shape
    if topk_idx.shape[:2] != (n_heads, n) or received.shape != (n_heads, n) or n_visible.shape != (n,):
        raise ViewError(f"statistics disagree in shape: entropy {tuple(entropy.shape)}, received "
                         f"{tuple(received.shape)}, n_visible {tuple(n_visible.shape)}, top-k {tuple(topk_idx.shape)}")
    if topk_idx.shape[-1] == 0 or not bool(torch.isfinite(entropy).any()):
        raise ViewError("these statistics hold no top-k keys or entropy (an lse-only StatsRun): run "
                         "model.stats(..., topk=8) with statistics='all'")
    tokens, labels = _tokens(tokens, n, "statistics"), _labels(labels, n_heads)
    idx = topk_idx.detach().cpu().long()
    ints = torch.round(topk_weight.detach().float().cpu().nan_to_num(0.0) * SCALE).to(torch.int64)
    keep = idx >= 0
    top_i = [[idx[h, q][keep[h, q]].tolist() for q in range(n)] for h in range(n_heads)]
    top_w = [[ints[h, q][keep[h, q]].tolist() for q in range(n)] for h in range(n_heads)]
    view = HtmlView({"kind": "stats", "title": title, "note": note, "tokens": tokens, "labels": labels,
                     "scale": SCALE, "k": int(topk_idx.shape[-1]), "signed": bool((ints < 0).any()),
                     "entropy": rounded(entropy.detach().float().cpu().tolist()),
                     "received": rounded(received.detach().float().cpu().tolist()),
                     "n_visible": [int(v) for v in n_visible.detach().cpu().nan_to_num(0.0).tolist()],
                     "topk_idx": top_i, "topk_w": top_w},
                    summary=f"token statistics view: {n} tokens, {n_heads} head(s)")
    check_budget(view.nbytes, max_bytes, f"a statistics view of {n_heads} head(s) × {n} tokens",
                 "show fewer heads or keep fewer top-k keys")
    return view


def grid_view(scores: torch.Tensor, *, title: str = "", colorbar: str = "score") -> HtmlView:
    """A layer × head heatmap of a score map as HTML: hover a cell for its value, click it to select the head.

    Values are shown to 4 decimals; undefined (NaN) cells are grey. In the explorer, the selection shows that head.

    Args:
        scores: the map `[L, H]` (layers down, heads across).
        title: a title shown above the grid.
        colorbar: the colour bar's label (what the scores are).

    Returns:
        An `HtmlView` of kind "grid".

    Raises:
        ViewError: a map that is not 2-D.
    """
    if scores.dim() != 2:
        raise ViewError(f"grid_view takes a [L, H] score map, got shape {tuple(scores.shape)}")
    values = rounded(scores.detach().float().cpu().tolist())
    return HtmlView({"kind": "grid", "title": title, "colorbar": colorbar, "values": values},
                    summary=f"layer × head grid of {colorbar}: {scores.shape[0]} × {scores.shape[1]}")
