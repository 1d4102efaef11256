"""What linearization does to each head, and to the model when the hardest heads stay softmax.

`transfer_report` measures, on held-out text, each head's attention-transfer error (KL of the softmax pattern to the
Hedgehog pattern, and the relative output error), beside the head's type from headlab's own scans of the base
model (induction, previous-token, sink share, mean row entropy; retrieval from a saved retrieval scan), and how the
error relates to each (Spearman; mean error of each type's top heads against the rest). `hybrid_sweep` keeps the k
hardest heads (largest relative output error) as softmax — a hybrid chosen head by head — and measures held-out
perplexity and needle recall against k; rows go to a JSONL file as they are measured (a rerun resumes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.analyses.metrics import spearman
from headlab.errors import HeadlabError
from headlab.linearize.transfer import head_losses, linear_pattern, record_layers, softmax_reference, text_tokens
from headlab.models.head_model import HeadModel
from headlab.paths import KJV_JOHN
from headlab.results import HeadScores, append_jsonl, read_jsonl, run_meta


def _maps_of(lin: HeadModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in range(lin.n_layers):
        module = lin.attention_module(layer)
        if not hasattr(module, "feature_map"):
            raise HeadlabError(f"{lin.name} is not a linearized model (no feature maps)")
        out.append((module.feature_map.detach().float(), module.feature_bias.detach().float()))
    return out


def transfer_report(base: HeadModel, lin: HeadModel, *, text: str | Path = KJV_JOHN, windows: int = 8,
                    seq_len: int = 128, types: dict[str, torch.Tensor] | None = None,
                    progress: bool = True) -> HeadScores:
    """Per-head transfer error on held-out text, with head-type maps.

    Args:
        base: the softmax model.
        lin: its linearization (same geometry).
        text: the held-out text file.
        windows: windows of the text.
        seq_len: tokens per window.
        types: per-head maps `[L, H]` to set beside the errors (e.g. induction, prev_token, sink, retrieval).
        progress: show a progress bar.

    Returns:
        HeadScores "linearize" (primary `rel_error`) with maps `[L, H]`: rel_error (relative output error), kl (of
        the softmax pattern to the Hedgehog pattern), entropy (the base pattern's mean row entropy, nats) and each of
        `types`.

    Raises:
        HeadlabError: models of different geometry, a `lin` without feature maps, a type map not `[L, H]`, or a
            bad text.
    """
    if (base.n_layers, base.n_heads) != (lin.n_layers, lin.n_heads):
        raise HeadlabError(f"{lin.name} ({lin.n_layers}×{lin.n_heads}) is not a linearization of {base.name} "
                           f"({base.n_layers}×{base.n_heads})")
    maps = _maps_of(lin)
    tokens = text_tokens(base, text, windows, seq_len)
    with torch.no_grad():
        records = record_layers(base, tokens)
    L, H = base.n_layers, base.n_heads
    kl, rel, ent = torch.zeros(L, H), torch.zeros(L, H), torch.zeros(L, H)
    scale = base.head_dim ** -0.5
    for layer in tqdm(range(L), desc="transfer error", disable=not progress, leave=False):
        q, k, v = records[layer]
        with torch.no_grad():
            p, out, kk, vv = softmax_reference(q, k, v, scale)
            lp = linear_pattern(q, kk, *maps[layer], eps=getattr(lin.hf.config, "linear_eps", 1e-6))
            losses = head_losses(p, out, lp, vv)
        kl[layer], rel[layer] = losses["kl"], losses["rel_error"]
        ent[layer] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean((0, 2))
    all_maps = {"rel_error": rel, "kl": kl, "entropy": ent}
    for name, m in (types or {}).items():
        m = torch.as_tensor(m, dtype=torch.float32)
        if m.shape != (L, H):
            raise HeadlabError(f"type map {name!r} has shape {tuple(m.shape)}, not {(L, H)}")
        all_maps[name] = m
    return HeadScores(analysis="linearize", model=lin.name, maps=all_maps, primary="rel_error",
                      params={"text": str(text), "windows": windows, "seq_len": seq_len, "base": base.name},
                      meta=run_meta(lin))


def relate(report: HeadScores, *, error: str = "rel_error", top: float = 0.1) -> dict[str, dict[str, float]]:
    """For each head-type map of a transfer report: how the transfer error relates to it.

    Args:
        report: a `transfer_report` HeadScores.
        error: the error map ("rel_error" or "kl").
        top: the share of heads (by the type's score) counted as the type's top heads.

    Returns:
        {type map: {"spearman": of the error with the map, "top_error": mean error of the top heads, "rest_error":
        of the others, "top_heads": how many}} (maps with fewer than three finite values are left out).
    """
    err = report.maps[error].flatten()
    out = {}
    for name, m in report.maps.items():
        if name in ("rel_error", "kl"):
            continue
        vals = m.flatten()
        keep = torch.isfinite(vals) & torch.isfinite(err)
        if int(keep.sum()) < 3:
            continue
        n_top = max(1, int(round(top * int(keep.sum()))))
        order = vals.masked_fill(~keep, float("-inf")).argsort(descending=True)
        top_idx, rest = order[:n_top], order[n_top:int(keep.sum())]
        out[name] = {"spearman": float(spearman(err[keep], vals[keep])),
                     "top_error": float(err[top_idx].mean()), "rest_error": float(err[rest].mean()),
                     "top_heads": n_top}
    return out


def hardest(report: HeadScores, k: int, *, error: str = "rel_error") -> list[list[int]]:
    """The k heads with the largest error, as per-layer lists (a `softmax_heads` config).

    Args:
        report: a `transfer_report` HeadScores (or any HeadScores with the map `error`).
        k: how many heads.
        error: the map to rank by (NaN last).

    Returns:
        L lists of sorted head indices.

    Raises:
        HeadlabError: k outside 0..L·H.
    """
    m = report.maps[error]
    L, H = m.shape
    if not 0 <= k <= L * H:
        raise HeadlabError(f"k = {k} heads out of range (0..{L * H})")
    rows: list[list[int]] = [[] for _ in range(L)]
    for i in m.flatten().nan_to_num(float("-inf")).argsort(descending=True)[:k].tolist():
        rows[i // H].append(i % H)
    return [sorted(r) for r in rows]


@dataclass(frozen=True, kw_only=True)
class HybridParams:
    """Settings of the hybrid sweep: how many heads stay softmax, and what is measured.

    Attributes:
        ks: the numbers of heads kept softmax.
        rank_by: the report's map whose largest heads stay softmax (the transfer error by default; e.g.
            "retrieval" keeps the retrieval heads).
        text: held-out text for perplexity.
        windows: windows of the text.
        ctx: tokens per window.
        needle_lengths: context lengths of the needle test.
        depths: needle depths (percent).
        needles: needle sets (empty: no needle test).
        max_new_tokens: tokens decoded per needle reply.
    """

    ks: tuple[int, ...] = (0, 9, 27, 54, 90, 135, 270)
    rank_by: str = "rel_error"
    text: str = str(KJV_JOHN)
    windows: int = 8
    ctx: int = 128
    needle_lengths: tuple[int, ...] = (512,)
    depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    needles: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 32


def hybrid_sweep(lin: HeadModel, report: HeadScores, params: HybridParams = HybridParams(), *,
                 out: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """For each k: the k hardest heads softmax, the rest linear; held-out perplexity and needle recall.

    Rows go to `out/hybrid.jsonl` (resumed). The model's softmax heads are restored at the end.

    Args:
        lin: a linearized HeadModel (`build_linearized`).
        report: its `transfer_report` (or any HeadScores with the `rank_by` map).
        params: the ks, ranking map, text and needle settings.
        out: a folder for hybrid.jsonl.
        progress: show a progress bar.

    Returns:
        One row per k, ascending: k, rank_by, softmax_share, loss, ppl, seconds and, with needles, recall, found,
        trials.

    Raises:
        HeadlabError: not a linearized model, or a `rank_by` that is not a map of the report.
    """
    from headlab.analyses.razor import Condition
    from headlab.analyses.retrieval import Trial, needle_sets, run_grid, text_prompt
    from headlab.prune.evals import TextEval

    hf = lin.hf
    if not hasattr(hf, "set_softmax_heads"):
        raise HeadlabError(f"{lin.name} is not a linearized model")
    if params.rank_by not in report.maps:
        raise HeadlabError(f"rank_by {params.rank_by!r} is not a map of the report: {', '.join(report.maps)}")
    path = Path(out) / "hybrid.jsonl" if out is not None else None
    sets = needle_sets()
    trials = [Trial(n, length, float(d)) for n in params.needles for length in params.needle_lengths
              for d in params.depths]
    # a row counts as done when it has what this run measures (a later run may add needle recall to it)
    done = {r["k"]: r for r in (read_jsonl(path) if path is not None else [])
            if (not trials or "recall" in r) and r.get("rank_by", "rel_error") == params.rank_by}
    rows = [done[k] for k in params.ks if k in done]
    before = [list(r) for r in hf.config.softmax_heads]
    ev = TextEval(path=params.text, ctx=params.ctx, windows=params.windows)
    try:
        for k in tqdm([k for k in params.ks if k not in done], desc="hybrid", disable=not progress):
            start = time.perf_counter()
            hf.set_softmax_heads(hardest(report, k, error=params.rank_by))
            loss = float(ev.loss(lin))
            row: dict[str, Any] = {"k": k, "rank_by": params.rank_by, "softmax_share": k / (lin.n_layers * lin.n_heads), "loss": loss,
                                   "ppl": math.exp(loss)}
            if trials:
                recs = run_grid(lin, lambda t: text_prompt(lin, sets[t.needle], t.length, t.depth), trials,
                                [Condition(name="baseline")], max_new_tokens=params.max_new_tokens, progress=False)
                row["recall"] = sum(r["recall"] for r in recs) / len(recs)
                row["found"] = sum(bool(r["found"]) for r in recs) / len(recs)
                row["trials"] = len(recs)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(path, row)
    finally:
        hf.set_softmax_heads(before)
    return sorted(rows, key=lambda r: r["k"])


def type_maps(base: HeadModel, *, retrieval: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Head-type maps `[L, H]` of the base model from headlab's scans.

    Args:
        base: the softmax model.
        retrieval: a saved retrieval-scan folder (its "retrieval" map), or None.
        progress: show progress bars.

    Returns:
        {"induction", "prev_token": from the induction scan; "sink": sink share from the sink scan; "retrieval"
        when a folder is given}.
    """
    from headlab.analyses.induction import induction_scan
    from headlab.analyses.sinks import sink_scan

    ind = induction_scan(base, progress=progress)
    sink = sink_scan(base, progress=progress)
    out = {"induction": ind.maps["induction"], "prev_token": ind.maps["prev_token"], "sink": sink.maps["sink_share"]}
    if retrieval is not None:
        out["retrieval"] = HeadScores.load(retrieval).maps["retrieval"]
    return out


def heads_by_error(report: HeadScores, n: int = 10) -> list[tuple[str, float]]:
    """The n heads hardest to linearize, with their relative output error.

    Args:
        report: a `transfer_report` HeadScores.
        n: how many.

    Returns:
        [("L3H1", error)], largest first.
    """
    return [(str(h), s) for h, s in report.top(n)]


__all__ = ["HybridParams", "hardest", "heads_by_error", "hybrid_sweep", "relate", "transfer_report",
           "type_maps"]
