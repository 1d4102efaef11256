"""The explorer's Sinks tab: attention sinks of the analysed prompt, and ACT calibration of chosen heads live.

The scan is `analyses.sinks.sink_scan` on the one prompt (per-key received attention from the streaming statistics,
no T×T pattern); calibration is the `Calibrate` edit (ACT) inside `hl.edit`, measured on the same prompt.
"""

from __future__ import annotations

import math
from typing import Any

import headlab as hl
from headlab.analyses.sinks import SinkParams, sink_scan
from headlab.edits.calibrate import Calibrate
from headlab.errors import EditError
from headlab.explore.core import Explorer, Session, _require, comparison_md, md_token, parse_heads, predict
from headlab.heads import HeadRef
from headlab.results import HeadScores
from headlab.sink_rule import SinkRule

SINK_MAPS = {"sink_share": "attention on the head's sinks", "first_score": "first-token column score",
             "later_share": "attention on non-initial sinks"}


def rule_for(min_visible: float | None) -> SinkRule:
    """ACT's absolute threshold τ = 0.1 with the tail rule at `min_visible` queries (1 switches it off)."""
    if min_visible is None or not math.isfinite(float(min_visible)) or int(min_visible) < 1:
        raise EditError(f"tail rule {min_visible!r}: the least number of queries that must see a key is an integer "
                        ">= 1 (1 switches the rule off, as in ACT's code)")
    return SinkRule(min_visible=int(min_visible))


def scan_prompt(ex: Explorer, session: Session, rule: SinkRule) -> HeadScores:
    """The sink scan of the session's prompt alone (its tokens as analysed, BOS included when it was)."""
    model = ex.cache.get(session.model)
    params = SinkParams(rule=rule, n_prompts=1, max_tokens=session.n_tokens, prepend_bos=False)
    return sink_scan(model, [list(session.ids)], params, progress=False)


def suggested_heads(scores: HeadScores, k: int = 3) -> list[HeadRef]:
    """Heads to calibrate first: the most attention on non-initial sinks, else on any sink (ACT leaves the first
    sink of each head alone, so heads with only a first-token sink gain nothing)."""
    key = "later_share" if float(scores.maps["later_share"].max()) > 0 else "sink_share"
    return [h for h, v in scores.top(k, map=key) if v > 0] or [h for h, _ in scores.top(k, map="sink_share")]


def tokens_md(scores: HeadScores, head: HeadRef) -> str:
    """The prompt's sink tokens: position 0 (heads with a first-token sink) and the non-initial sinks (heads each),
    with the chosen head's own sinks marked."""
    sinks = scores.items["sink_mask"][0].bool()  # [L, H, S]
    tokens = scores.meta["prompt_tokens"][0]
    n_heads = sinks.shape[0] * sinks.shape[1]
    per_key = sinks.flatten(0, 1).sum(0)  # [S] heads with a sink there
    own = sinks[head.layer, head.head]
    lines = [f"**{scores.model}**, {len(tokens)} tokens, sink = {scores.meta['rule']}.",
             f"First-token sink {md_token(f'0:{tokens[0]}', table=False)}: {int(per_key[0])} of {n_heads} heads"
             + (f" (including {head})" if bool(own[0]) else "") + "."]
    later = [(j, int(per_key[j])) for j in range(1, len(tokens)) if int(per_key[j])]
    if later:
        rows = "\n".join(f"| {md_token(f'{j}:{tokens[j]}')} | {n} | {'yes' if bool(own[j]) else ''} |"
                         for j, n in sorted(later, key=lambda t: -t[1])[:12])
        lines.append(f"Non-initial sinks on {len(later)} tokens:\n\n| token | heads | {head} |\n|---|---|---|\n{rows}")
    else:
        lines.append("No non-initial sinks on this prompt (the tail rule leaves keys that fewer queries see alone).")
    return "\n\n".join(lines)


def sinks_view(ex: Explorer, session: Session | None, head_text: str, map_name: str,
               min_visible: float | None) -> tuple[str, Any, Any, str, str]:
    """(status, the layer × head grid of a sink map, one head's per-key column scores with its sinks red, Markdown on
    the sink tokens, the suggested heads to calibrate as text)."""
    _require(session)
    if map_name not in SINK_MAPS:
        raise EditError(f"unknown sink map {map_name!r}: choose one of {', '.join(SINK_MAPS)}")
    scores = scan_prompt(ex, session, rule_for(min_visible))
    suggested = suggested_heads(scores)
    head = HeadRef.parse(head_text) if (head_text or "").strip() else suggested[0]
    ex.cache.get(session.model).check_heads([head])
    grid = hl.viz.heatmap(scores.maps[map_name], colorbar=map_name, title=f"{SINK_MAPS[map_name]} per head")
    column = hl.viz.column_figure(scores, head)
    status = (f"Scanned {session.n_tokens} tokens for sinks: {scores.meta['share_first_sink']:.0%} of heads have a "
              f"first-token sink, {scores.meta['later_hits']} non-initial sink hits; showing {head}.")
    return status, grid, column, tokens_md(scores, head), ", ".join(map(str, suggested))


def calibrate_view(ex: Explorer, session: Session | None, heads_text: str, beta: float | None,
                   min_visible: float | None, use_edit: bool = True) -> tuple[str, str]:
    """(status, Markdown of the predictions and loss, original beside ACT-calibrated) for chosen heads; `use_edit`
    False compares the original with itself (the calibration toggled off)."""
    _require(session)
    model = ex.cache.get(session.model)
    if not model.is_lm:
        raise EditError(f"{model.name} has no LM head: calibration is measured through next-token predictions")
    heads = parse_heads(model, heads_text)
    if beta is None or not math.isfinite(float(beta)) or not 0.0 <= float(beta) <= 1.0:
        raise EditError(f"beta {beta!r} must lie in [0, 1]: the share of the sinks' attention they keep")
    edit = Calibrate(heads=tuple(heads), beta=float(beta), rule=rule_for(min_visible))
    loss, top = predict(model, model.encode(list(session.ids)), ex.settings.top_k, edit if use_edit else [])
    label = (f"ACT calibration β={float(beta):g} of {', '.join(map(str, heads))}" if use_edit
             else "calibration off (original)")
    body = comparison_md(session.top, top, session.loss, loss, label)
    return f"Calibrated {len(heads)} heads on {session.n_tokens} tokens (the shared model is untouched).", body
