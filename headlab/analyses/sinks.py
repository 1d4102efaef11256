"""Attention sinks of every head (Yu et al. 2024, ACT): column scores, sinks at the first token and later, their tokens.

For a head with pattern A over a prompt of N real tokens, key j's column score is

    s_j = Σ_i A_ij / n_j,

the mean attention j receives from the n_j real queries that may see it (causal: n_j = N − j, what ACT's code divides
by; an encoder: n_j = N). It comes from `HeadModel.stats` (`received`, `n_visible`): O(T) memory, no T×T pattern.
A key is a sink when s_j passes the threshold — ACT's code's absolute τ = 0.1, or α/N (the paper's, as secondary
sources state it; α is unconfirmed: 5 by default here, i.e. five times the uniform share) — and at least
min(min_visible, N) real queries see it. The last keys of a causal prompt are judged by a handful of rows and pass any
threshold by accident; `min_visible` (32 by default; 1 switches the rule off, as in ACT's code) is that tail rule.
Sinks at position 0 are first-token sinks; the others are non-initial ("hidden") sinks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from headlab.errors import PromptError
from headlab.models.head_model import HeadModel, Prompt
from headlab.paths import SINKS_DIR
from headlab.results import HeadScores, params_dict, run_meta
from headlab.run import Batch
from headlab.sink_rule import (  # noqa: F401 (re-exported)
    SinkRule,
    column_scores,
    exempt_first,
    qualifying,
    sink_mask,
)
from headlab.viz.sinks import column_figure  # noqa: F401  (re-exported: the figure lives in viz)

DATA = SINKS_DIR
MAPS = ("sink_share", "first_score", "first_sink", "later_any", "later_sinks", "later_share")


@dataclass(frozen=True, kw_only=True)
class SinkParams:
    """Settings of the sink scan.

    Attributes:
        rule: when a key is a sink.
        n_prompts: how many of the bundled KJV passages to use when no prompts are given.
        max_tokens: prompts are cut to this many tokens (BOS included).
        prepend_bos: put the model's BOS first on causal models (SmolLM2's tokenizer adds none).
        minibatch: prompts per forward.
        impl: head-statistics implementation ("auto": Triton on CUDA, the torch reference elsewhere).
    """

    rule: SinkRule = field(default_factory=SinkRule)
    n_prompts: int = 8
    max_tokens: int = 160
    prepend_bos: bool = True
    minibatch: int = 4
    impl: str = "auto"


def kjv_prompts(n: int = 8) -> list[str]:
    """The first n of 16 King James Bible passages (~200–300 tokens each) committed under data/sinks/.

    Args:
        n: how many passages (at most 16).

    Returns:
        The passages' texts.
    """
    passages = json.loads((DATA / "kjv_passages.json").read_text())["passages"]
    return [p["text"] for p in passages[:n]]


def sink_scan(model: HeadModel, prompts: Prompt | None = None, params: SinkParams = SinkParams(), *,
              progress: bool = True) -> HeadScores:
    """Column scores and sinks of every head over some prompts (default: KJV passages); primary map: sink_share.

    Prompts are anything `HeadModel.encode` reads (texts, token ids, a Batch); they are cut to `max_tokens`.

    Maps `[L, H]` (means over prompts): sink_share (attention mass on the head's sinks), first_score (s_0),
    first_sink (share of prompts where position 0 is a sink), later_any (share with a non-initial sink),
    later_sinks (how many), later_share (mass on them). Items: column_score `[B, L, H, S]` (NaN where the tail
    rule or padding excludes the key), sink_mask `[B, L, H, S]`, tokens `[B, S]`, n_visible `[B, S]`.

    Args:
        model: the HeadModel to scan.
        prompts: the prompts (None: `params.n_prompts` bundled KJV passages).
        params: the sink rule, prompt count and length, BOS, minibatch and head-statistics implementation.
        progress: show a progress bar.

    Returns:
        HeadScores (analysis "sinks") with the maps and items above.

    Raises:
        PromptError: a bad prompt.
    """
    start = time.perf_counter()
    rule = params.rule
    bos = params.prepend_bos and model.causal and model.bos_id is not None
    limit = min(params.max_tokens, model.max_context) if model.max_context else params.max_tokens
    batch = model.encode(kjv_prompts(params.n_prompts) if prompts is None else prompts, prepend_bos=bos,
                         truncate=limit)  # cut before the context check: long passages fit short models
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    n_b, n_s, n_l, n_h = ids.shape[0], ids.shape[1], model.n_layers, model.n_heads
    received = torch.zeros(n_b, n_l, n_h, n_s)
    n_visible = torch.zeros(n_b, n_s)
    starts = range(0, n_b, params.minibatch)
    for i0 in tqdm(starts, desc=f"sink scan {model.name}", disable=not progress, leave=False):
        i1 = i0 + params.minibatch
        # only received mass is read: on the CPU it comes with each layer's output from the one-sweep kernel
        run = model.stats(Batch(ids[i0:i1], mask[i0:i1]), impl=params.impl, statistics={"received"})
        for layer, st in run.layers.items():
            received[i0:i1, layer] = st.received.cpu()
            n_visible[i0:i1] = st.n_visible.cpu()

    flat = received.view(n_b, n_l * n_h, n_s)
    sinks = sink_mask(flat, n_visible, rule).view(n_b, n_l, n_h, n_s)
    raw = sink_mask(flat, n_visible, replace(rule, min_visible=1)).view(n_b, n_l, n_h, n_s)
    score = column_scores(flat, n_visible, rule).view(n_b, n_l, n_h, n_s)
    n_q = n_visible.amax(-1)[:, None, None]  # [B, 1, 1] real queries per prompt
    maps = {
        "sink_share": ((received * sinks).sum(-1) / n_q).mean(0),
        "first_score": score[..., 0].mean(0),
        "first_sink": sinks[..., 0].float().mean(0),
        "later_any": sinks[..., 1:].any(-1).float().mean(0),
        "later_sinks": sinks[..., 1:].sum(-1).float().mean(0),
        "later_share": ((received[..., 1:] * sinks[..., 1:]).sum(-1) / n_q).mean(0),
    }
    ok = qualifying(n_visible, rule.min_visible)
    lengths = mask.sum(-1).tolist()
    meta = run_meta(model, seconds=round(time.perf_counter() - start, 2), rule=rule.describe(), n_prompts=n_b,
                    prompt_lengths=lengths,
                    share_first_sink=float((maps["first_sink"] >= 0.5).float().mean()),
                    share_later_sink=float((maps["later_any"] >= 0.5).float().mean()),
                    later_hits=int(sinks[..., 1:].sum()), raw_later_hits=int(raw[..., 1:].sum()),
                    raw_later_hits_in_tail=int((raw[..., 1:] & ~ok[:, None, None, 1:]).sum()),
                    prompt_tokens=[model.token_strings(ids[b, :n].tolist()) for b, n in enumerate(lengths)])
    scores = HeadScores(analysis="sinks", model=model.name, maps=maps, primary="sink_share",
                        params=params_dict(params), meta=meta,
                        items={"column_score": score, "sink_mask": sinks.to(torch.uint8), "tokens": ids,
                               "n_visible": n_visible})
    scores.meta["sink_tokens"] = sink_tokens(scores)
    return scores


def sink_tokens(scores: HeadScores, *, top: int = 12) -> list[dict]:
    """The tokens that are non-initial sinks, most hits first.

    Each entry: token (its text), hits ((prompt, head, position) sinks on it), heads (distinct heads with one),
    occurrences (its qualifying positions ≥ 1 in the prompts), sunk (how many of those are a sink of some head)
    and rate = hits / (occurrences × heads of the model).

    Args:
        scores: a sink scan's HeadScores.
        top: how many tokens.

    Returns:
        The entries above, most hits first.
    """
    sinks = scores.items["sink_mask"].bool()[..., 1:]  # [B, L, H, S-1]
    n_b, n_l, n_h, _ = sinks.shape
    ok = qualifying(scores.items["n_visible"], scores.params["rule"]["min_visible"])[:, 1:]  # [B, S-1]
    tokens = scores.meta["prompt_tokens"]
    per_pos = sinks.permute(0, 3, 1, 2).reshape(n_b, -1, n_l * n_h)  # [B, S-1, L*H]
    table: dict[str, dict] = {}
    for b in range(n_b):
        for j in ok[b].nonzero().flatten().tolist():
            text = tokens[b][j + 1]
            entry = table.setdefault(text, {"token": text, "hits": 0, "heads": torch.zeros(n_l * n_h, dtype=torch.bool),
                                            "occurrences": 0, "sunk": 0})
            entry["occurrences"] += 1
            entry["sunk"] += int(per_pos[b, j].any())
            entry["hits"] += int(per_pos[b, j].sum())
            entry["heads"] |= per_pos[b, j]
    rows = sorted((e for e in table.values() if e["hits"]), key=lambda e: -e["hits"])[:top]
    return [{**e, "heads": int(e["heads"].sum()), "rate": round(e["hits"] / (e["occurrences"] * n_l * n_h), 4)}
            for e in rows]


def summary_lines(scores: HeadScores, *, top: int = 8) -> list[str]:
    """Printable lines: first-token and non-initial sink shares, the sink tokens, the heads with most later sinks.

    Args:
        scores: a sink scan's HeadScores.
        top: how many heads to list.

    Returns:
        The lines, without newlines.
    """
    m, n_heads = scores.meta, scores.scores.numel()
    first = m["prompt_tokens"][0][0] if m["prompt_tokens"] else "?"
    lines = [f"{scores.model}: {m['n_prompts']} prompts of {min(m['prompt_lengths'])}–{max(m['prompt_lengths'])} "
             f"tokens; sink = {m['rule']}",
             f"heads with a first-token sink ({first!r}) in ≥ half the prompts: {m['share_first_sink']:.1%} "
             f"({round(m['share_first_sink'] * n_heads)}/{n_heads})",
             f"heads with a non-initial sink in ≥ half the prompts: {m['share_later_sink']:.1%} "
             f"({round(m['share_later_sink'] * n_heads)}/{n_heads})",
             f"non-initial sink hits: {m['later_hits']} with the tail rule; {m['raw_later_hits']} without it, "
             f"{m['raw_later_hits_in_tail']} of them on tail keys the rule excludes",
             "non-initial sink tokens: hits, heads, occurrences that are a sink / all, hit rate"]
    lines += [f"  {e['token']!r:>14}  {e['hits']:6d}  {e['heads']:4d}  {e['sunk']:4d}/{e['occurrences']:<4d}  "
              f"{e['rate']:.3f}" for e in m["sink_tokens"]]
    lines.append("heads with the most attention on non-initial sinks: " + ", ".join(
        f"{h} {v:.2f}" for h, v in scores.top(top, map="later_share")))
    return lines


def read_prompts(path: Path | None, n: int) -> list:
    """Prompts from a .txt file (separated by blank lines) or a .json list (of strings, or of token-id lists).

    Args:
        path: the file, or None for the bundled KJV passages.
        n: how many bundled passages when path is None.

    Returns:
        The prompts: strings, or token-id lists.

    Raises:
        PromptError: invalid JSON, not a non-empty list, an item that is neither a non-empty string nor a list of
            ints, or no prompts (the message names the file and the item).
    """
    if path is None:
        return kjv_prompts(n)
    text = path.read_text()
    if path.suffix != ".json":
        prompts = [t.strip() for t in text.split("\n\n") if t.strip()]
    else:
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(prompts, list) or not prompts:
            raise PromptError(f"{path} must hold a non-empty JSON list of prompts")
        for i, p in enumerate(prompts):
            ok = (isinstance(p, str) and p.strip()) or (isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p))
            if not ok:
                raise PromptError(f"{path}: prompt {i} is {p!r}: each prompt is a non-empty string or a list of "
                                  "token ids (a flat list of ids is one prompt: wrap it in a list)")
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts[:n]
