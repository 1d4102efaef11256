"""The explorer's Retrieval tab: one needle in a haystack, decoded live on the analysed prompt's model.

Stages (each yields the view so far, so the app shows progress and can cancel between them): build the needle
prompt (`analyses.retrieval.text_prompt`), find RazorAttention's retrieval KV heads (an echo/induction scan on
repeated random tokens, once per model), decode the baseline with per-head retrieval scores, then decode with the
top-K heads masked, with K random heads masked, with RazorAttention's cache and with the same cache on every head
(none kept full). Every decode is `analyses.retrieval.run_trial`, the scan's own harness.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterator

import torch

import headlab as hl
from headlab.analyses.razor import Condition, RazorParams, echo_induction_scan, razor_conditions, retrieval_kv_heads
from headlab.analyses.retrieval import NeedlePrompt, needle_sets, run_trial, text_prompt
from headlab.errors import PromptError
from headlab.explore.core import Explorer, Session, _require, md_token
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel
from headlab.results import HeadScores

#: The echo/induction scan's settings in the app: 1 + 4 × 64 tokens (the CLI's default block is 256).
APP_RAZOR = RazorParams(block=64)
_SCANS: dict[tuple, HeadScores] = {}
_SCAN_LOCK = threading.Lock()


def razor_scan(model: HeadModel) -> HeadScores:
    """The echo/induction scan of a model with APP_RAZOR, computed once per process (it depends on nothing else)."""
    key = (model.name, id(model.owner))
    with _SCAN_LOCK:
        if key not in _SCANS:
            _SCANS[key] = echo_induction_scan(model, APP_RAZOR, progress=False)
        return _SCANS[key]


def check_settings(ex: Explorer, model: HeadModel, needle: float | None, length: float | None,
                   depth: float | None, k: float | None, window: float | None) -> tuple[int, int, float, int, int]:
    """The tab's numbers checked against the model and the explorer's cap; a PromptError names the bad one."""
    if model.tokenizer is None or not model.is_lm:
        raise PromptError(f"{model.name} cannot answer a needle question: the retrieval tab needs a causal LM with a "
                          "tokenizer (e.g. smollm2-135m)")
    sets = needle_sets()
    values = {"needle": needle, "length": length, "depth": depth, "K": k, "window": window}
    for name, value in values.items():
        if value is None or not math.isfinite(float(value)):
            raise PromptError(f"{name} must be a number, got {value!r}")
    cap = min(ex.settings.max_tokens, model.max_context or ex.settings.max_tokens)
    if not 0 <= int(needle) < len(sets):
        raise PromptError(f"needle {int(needle)}: choose 0..{len(sets) - 1}")
    if not 128 <= int(length) <= cap:
        raise PromptError(f"haystack length {int(length)} tokens: choose 128..{cap} (the explorer's cap and the "
                          "model's context)")
    if not 0.0 <= float(depth) <= 100.0:
        raise PromptError(f"needle depth {float(depth):g}%: choose 0..100")
    if not 1 <= int(k) <= model.n_layers * model.n_heads // 2:
        raise PromptError(f"K = {int(k)} heads to mask: choose 1..{model.n_layers * model.n_heads // 2}")
    if int(window) < 1:
        raise PromptError(f"RazorAttention window {int(window)}: choose at least 1 token")
    return int(needle), int(length), float(depth), int(k), int(window)


def ranked_heads(scores: torch.Tensor, induction: torch.Tensor) -> list[HeadRef]:
    """Heads by this trial's retrieval score, ties (most heads score 0 on one needle) broken by induction score."""
    n_heads = scores.shape[1]
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores.flatten()[i]), -float(induction.flatten()[i])))
    return [HeadRef(i // n_heads, i % n_heads) for i in order]


def random_heads(ranked: list[HeadRef], k: int, seed: int) -> tuple[HeadRef, ...]:
    """K heads drawn (seeded) from outside the top max(K, 10 %) of the ranking, as the retrieval scan draws them."""
    pool = ranked[max(k, round(0.1 * len(ranked))):]
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return tuple(sorted(pool[i] for i in pick))


def conditions_for(ranked: list[HeadRef], full: frozenset, k: int, window: int, seed: int) -> list[Condition]:
    """Top-K masked, K random masked, RazorAttention at `window`, the same window on every head."""
    return [Condition(name=f"top{k}-uniform", mask=tuple(ranked[:k])),
            Condition(name=f"random{k}-uniform", mask=random_heads(ranked, k, seed)),
            *razor_conditions(full, [window], controls=True)]


def table_md(prompt: NeedlePrompt, records: list[dict[str, Any]]) -> str:
    """The conditions decoded so far: reply, ROUGE-1 recall, and the share of the KV cache kept."""
    rows = []
    for rec in records:
        kv = f"{rec['kv']['fraction']:.1%}" if "kv" in rec else "100%"
        reply = rec["reply"].replace("|", "\\|").replace("\n", " ")[:90] or "∅"
        rows.append(f"| {rec['condition']} | {reply} | {rec['recall']:.2f} | {'yes' if rec['found'] else 'no'} | "
                    f"{kv} |")
    answer = " ".join(prompt.reference)
    return (f"Needle span: tokens {prompt.span[0]}..{prompt.span[1] - 1} of {len(prompt.ids)}; the answer's words: "
            f"*{answer}*.\n\n| condition | reply | recall | counts | KV cache kept |\n|---|---|---|---|---|\n"
            + "\n".join(rows))


def needle_steps(ex: Explorer, session: Session | None, needle: float | None, length: float | None,
                 depth: float | None, k: float | None, window: float | None,
                 seed: int = 0) -> Iterator[tuple[str, Any, str]]:
    """Yield (status, the trial's per-head retrieval scores as a grid, Markdown of the conditions) after each stage.

    The model is the analysed prompt's (the Heads tab); the prompt is a new one: needle set `needle` at `depth`
    percent of a `length`-token KJV haystack, with its question.
    """
    _require(session)
    model = ex.cache.get(session.model)
    needle, length, depth, k, window = check_settings(ex, model, needle, length, depth, k, window)
    prompt = text_prompt(model, needle_sets()[needle], length, depth)
    yield f"Built a {len(prompt.ids)}-token needle prompt; scanning echo/induction heads (once per model) …", None, ""
    razor = razor_scan(model)
    full = retrieval_kv_heads(razor)
    yield "Decoding the baseline and scoring every head …", None, ""
    base = run_trial(model, prompt, [Condition(name="baseline", score=True)])[0]
    scores = torch.tensor(base["scores"])
    grid = hl.viz.heatmap(scores, colorbar="retrieval", title="retrieval score per head on this needle (baseline)")
    ranked = ranked_heads(scores, razor.maps["induction"])
    records = [base]
    top = ", ".join(f"{h} {float(scores[h.layer, h.head]):.2f}" for h in ranked[:min(k, 8)])
    conditions = conditions_for(ranked, full, k, window, seed)
    for i, cond in enumerate(conditions):
        yield (f"Baseline reply recall {base['recall']:.2f}; top heads: {top}. Decoding {cond.name} "
               f"({i + 1}/{len(conditions)}) …"), grid, table_md(prompt, records)
        records += run_trial(model, prompt, [cond])
    masked = records[1]
    note = (f" Masking the top {k} changed the reply ({md_token(masked['reply'][:40], table=False)})."
            if masked["reply"] != base["reply"] else f" Masking the top {k} left the reply unchanged.")
    status = (f"Decoded {len(records)} conditions on a {len(prompt.ids)}-token haystack (needle at {depth:g}%). "
              f"Baseline recall {base['recall']:.2f}.{note} RazorAttention keeps {len(full)} of "
              f"{model.n_layers * model.n_kv_heads} KV heads full.")
    yield status, grid, table_md(prompt, records)
