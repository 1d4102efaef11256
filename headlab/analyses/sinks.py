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

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel, Prompt
from headlab.results import SCORES_FILE, HeadScores, params_dict, run_meta
from headlab.run import Batch
from headlab.viz.figures import token_ticks

DATA = Path(__file__).resolve().parents[2] / "data" / "sinks"
MAPS = ("sink_share", "first_score", "first_sink", "later_any", "later_sinks", "later_share")


@dataclass(frozen=True, kw_only=True)
class SinkRule:
    """When a key is a sink.

    Attributes:
        threshold: "absolute" (s_j > tau, ACT's code) or "relative" (s_j > alpha / N, N the prompt's real length).
        tau: the absolute threshold.
        alpha: the relative threshold's factor (unconfirmed in the paper; our default).
        min_visible: a key must be seen by at least min(min_visible, N) real queries (the tail rule; 1 = off).
    """

    threshold: Literal["absolute", "relative"] = "absolute"
    tau: float = 0.1
    alpha: float = 5.0
    min_visible: int = 32

    def __post_init__(self) -> None:
        if self.threshold not in ("absolute", "relative"):
            raise ValueError(f"SinkRule.threshold must be 'absolute' or 'relative', got {self.threshold!r}")
        if self.min_visible < 1:
            raise ValueError(f"SinkRule.min_visible must be >= 1, got {self.min_visible}")

    def describe(self) -> str:
        cut = f"s_j > {self.tau:g}" if self.threshold == "absolute" else f"s_j > {self.alpha:g}/N"
        return f"{cut}, seen by >= min({self.min_visible}, N) queries"


def qualifying(n_visible: torch.Tensor, min_visible: int) -> torch.Tensor:
    """Bool `[B, S]`: keys seen by at least min(min_visible, N) real queries (N = the most any key is seen by)."""
    n_real = n_visible.amax(-1, keepdim=True)  # [B, 1]: all real queries see key 0 (causal) or every key (encoder)
    return (n_visible >= n_real.clamp(max=float(min_visible))) & (n_visible > 0)


def column_scores(received: torch.Tensor, n_visible: torch.Tensor, rule: SinkRule | None = None) -> torch.Tensor:
    """Column scores `[B, H, S]` from `received` `[B, H, S]` and `n_visible` `[B, S]`; NaN where the tail rule fails."""
    ok = qualifying(n_visible, rule.min_visible if rule is not None else 1)[:, None]
    score = received / n_visible.clamp_min(1.0)[:, None]
    return torch.where(ok, score, torch.full_like(score, float("nan")))


def sink_mask(received: torch.Tensor, n_visible: torch.Tensor, rule: SinkRule) -> torch.Tensor:
    """Bool `[B, H, S]`: the sinks of each head under `rule` (shapes as in `column_scores`)."""
    score = received / n_visible.clamp_min(1.0)[:, None]
    if rule.threshold == "absolute":
        cut = torch.full_like(n_visible[:, :1], rule.tau)
    else:
        cut = rule.alpha / n_visible.amax(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    return qualifying(n_visible, rule.min_visible)[:, None] & (score > cut[:, :, None])


def exempt_first(mask: torch.Tensor) -> torch.Tensor:
    """The mask without its first True along the last axis (ACT's code leaves the first sink, usually BOS, alone)."""
    return mask & (mask.long().cumsum(-1) != 1)


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
    """The first n of 16 King James Bible passages (~200–300 tokens each) committed under data/sinks/."""
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
    """
    start = time.perf_counter()
    rule = params.rule
    bos = params.prepend_bos and model.causal and model.bos_id is not None
    batch = model.encode(kjv_prompts(params.n_prompts) if prompts is None else prompts, prepend_bos=bos)
    ids, mask = _truncate(model, batch, params.max_tokens)
    n_b, n_s, n_l, n_h = ids.shape[0], ids.shape[1], model.n_layers, model.n_heads
    received = torch.zeros(n_b, n_l, n_h, n_s)
    n_visible = torch.zeros(n_b, n_s)
    starts = range(0, n_b, params.minibatch)
    for i0 in tqdm(starts, desc=f"sink scan {model.name}", disable=not progress, leave=False):
        i1 = i0 + params.minibatch
        run = model.stats(Batch(ids[i0:i1], mask[i0:i1]), impl=params.impl)
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


def _truncate(model: HeadModel, batch: Batch, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask `[B, ≤max_tokens]` on the CPU; a cut prompt keeps its closing special token (e.g. [SEP])."""
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    out_ids, out_mask = ids[:, :max_tokens].clone(), mask[:, :max_tokens].clone()
    for b, n in enumerate(batch.lengths):
        if n > max_tokens and int(ids[b, n - 1]) in special:
            out_ids[b, max_tokens - 1] = ids[b, n - 1]
    return out_ids, out_mask


def sink_tokens(scores: HeadScores, *, top: int = 12) -> list[dict]:
    """The tokens that are non-initial sinks, most hits first.

    Each entry: token (its text), hits ((prompt, head, position) sinks on it), heads (distinct heads with one),
    occurrences (its qualifying positions ≥ 1 in the prompts), sunk (how many of those are a sink of some head)
    and rate = hits / (occurrences × heads of the model).
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
    """Printable lines: first-token and non-initial sink shares, the sink tokens, the heads with most later sinks."""
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


def column_figure(scores: HeadScores, head: HeadRef, *, index: int = 0, title: str | None = None) -> go.Figure:
    """Bar chart of one head's per-token column scores on prompt `index`; sinks in red, the threshold dashed."""
    col = scores.items["column_score"][index, head.layer, head.head]  # [S]
    sinks = scores.items["sink_mask"][index, head.layer, head.head].bool()
    tokens = scores.meta["prompt_tokens"][index]
    ticks, labels = token_ticks(tokens)
    values = col[: len(tokens)].nan_to_num(0.0).tolist()
    colors = ["crimson" if bool(s) else "steelblue" for s in sinks[: len(tokens)]]
    fig = go.Figure(go.Bar(x=ticks, y=values, marker_color=colors, customdata=labels,
                           hovertemplate="%{customdata}: %{y:.3f}<extra></extra>"))
    rule = scores.params["rule"]
    cut = rule["tau"] if rule["threshold"] == "absolute" else rule["alpha"] / len(tokens)
    fig.add_hline(y=cut, line_dash="dash", line_color="grey")
    fig.update_layout(title=title or f"{head} column scores — {scores.model} (prompt {index}; sinks red; tail 0)",
                      xaxis={"tickmode": "array", "tickvals": ticks[::max(1, len(ticks) // 60)],
                             "ticktext": labels[::max(1, len(ticks) // 60)], "tickfont": {"size": 8}},
                      yaxis_title="column score", height=420, width=max(700, 8 * len(ticks)))
    return fig


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, minilm-l6, ...) or a local HF folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_rule_args(p: argparse.ArgumentParser, *, min_visible: int) -> None:
    """The SinkRule options of a command line."""
    p.add_argument("--threshold", choices=("absolute", "relative"), default="absolute",
                   help="absolute: s_j > tau (ACT's code); relative: s_j > alpha/N")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=5.0,
                   help="factor of the relative threshold (unconfirmed in the paper)")
    p.add_argument("--min-visible", type=int, default=min_visible,
                   help="tail rule: a sink must be seen by this many queries (1: off, as in ACT's code)")


def rule_from_args(args: argparse.Namespace) -> SinkRule:
    return SinkRule(threshold=args.threshold, tau=args.tau, alpha=args.alpha, min_visible=args.min_visible)


def add_scan_sinks(scan_subparsers) -> None:
    """Add `headlab scan sinks` to the `scan` command's subparsers."""
    p = scan_subparsers.add_parser("sinks", help="attention sinks of every head: column scores, first and later sinks")
    _model_args(p)
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--prompts", type=Path, default=None,
                   help="a .txt file (prompts separated by blank lines) or a .json list; default: bundled KJV passages")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS on causal models")
    add_rule_args(p, min_visible=32)
    p.add_argument("--force", action="store_true", help="recompute even if --out holds this scan already")
    p.set_defaults(handler=cmd_scan_sinks)


def register(subparsers) -> None:
    """Add the top-level `calibrate` command (ACT head search and evaluation) to the `headlab` parser."""
    from headlab.analyses.calibration import add_calibrate_args, cmd_calibrate

    p = subparsers.add_parser("calibrate", help="ACT attention calibration: search heads on a calibration split, "
                                                "evaluate before/after (resumable)")
    _model_args(p)
    add_calibrate_args(p)
    p.set_defaults(handler=cmd_calibrate)


def _read_prompts(path: Path | None, n: int) -> list[str]:
    if path is None:
        return kjv_prompts(n)
    text = path.read_text()
    prompts = json.loads(text) if path.suffix == ".json" else [t.strip() for t in text.split("\n\n") if t.strip()]
    return prompts[:n]


def cmd_scan_sinks(args: argparse.Namespace) -> int:
    """Run (or reload) a sink scan, write its figures and print what it found."""
    import headlab as hl

    params = SinkParams(rule=rule_from_args(args), n_prompts=args.n_prompts, max_tokens=args.max_tokens,
                        prepend_bos=not args.no_bos)
    out = args.out
    if (out / SCORES_FILE).exists() and not args.force:
        done = HeadScores.load(out)
        if done.params == params_dict(params) and done.meta.get("source") == str(args.prompts or "kjv"):
            print(f"{out} holds this scan already (--force to redo):")
            print("\n".join(summary_lines(done)))
            return 0
    model = hl.load(args.model, device=args.device, dtype=args.dtype)
    print(model)
    scores = sink_scan(model, _read_prompts(args.prompts, args.n_prompts), params)
    scores.meta["source"] = str(args.prompts or "kjv")
    scores.save(out)
    for key in ("sink_share", "first_score", "later_share"):
        scores.figure(key).write_html(out / f"heatmap_{key}.html", include_plotlyjs="cdn")
    for key in ("later_share", "first_score"):
        head = scores.top(1, map=key)[0][0]
        column_figure(scores, head).write_html(out / f"column_{key}_{head}.html", include_plotlyjs="cdn")
    print("\n".join(summary_lines(scores)))
    print(f"wrote {out}/ in {scores.meta['seconds']} s")
    return 0
