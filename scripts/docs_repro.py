"""Reproduction sections for retrieval heads and head pruning on SmolLM2-135M (used by docs_gen.py).

Both read the folders the real commands wrote, committed under benchmarks/results/:

- retrieval_smollm2/: `headlab scan retrieval` (scores.json, summary.json, records.json, razor/) and
  command.json (the command line and its wall-clock time, written by the run);
- prune_smollm2/: `headlab prune` (run.json, results.jsonl, rankings/, atp_vs_ablation.json) and command.json.

A section is left out while its folder is absent.
"""

from __future__ import annotations

import json
from statistics import mean

from docs_common import ROOT, _fence, _num, _pct, _read, _table

RETRIEVAL = "benchmarks/results/retrieval_smollm2"
PRUNE = "benchmarks/results/prune_smollm2"


def _command(rel: str) -> tuple[str, str]:
    """(command line, run time) from a result folder's command.json."""
    c = _read(f"{rel}/command.json")
    secs = c["wall_seconds"]
    when = f"{secs / 60:.0f} min" if secs >= 120 else f"{secs:.0f} s"
    note = f" Note: {c['note']}" if c.get("note") else ""
    return c["command"], (f"{when} wall clock on this {c.get('cpus', 2)}-core CPU shared with other jobs, "
                          f"{c.get('threads', 1)} torch thread.{note}")


def _share(records: list[dict], condition: str, length: int | None = None) -> tuple[float, float, int]:
    """(mean recall, share of replies that count, n) of one condition, optionally at one prompt length."""
    rs = [r for r in records if r["condition"] == condition and (length is None or r["length"] == length)]
    if not rs:
        return float("nan"), float("nan"), 0
    return mean(r["recall"] for r in rs), mean(bool(r["found"]) for r in rs), len(rs)


def retrieval_section() -> list[str]:
    if not (ROOT / RETRIEVAL / "command.json").exists():  # written when the run has finished
        return []
    scores = _read(f"{RETRIEVAL}/scores.json")
    meta, params = scores["meta"], scores["params"]
    records = _read(f"{RETRIEVAL}/records.json")["records"]
    command, took = _command(RETRIEVAL)
    n_heads = meta["n_layers"] * meta["n_heads"] if "n_layers" in meta else None
    ranked = _ranked_heads(scores)
    out = ["## Retrieval heads (Wu et al. 2024) and RazorAttention on SmolLM2-135M", "",
           "**Claims** (ALGORITHMS.md): retrieval heads are *sparse* — about 3–6% of heads score above 0.1 and "
           "under 5% above 0.5 (a head scores when its top-1 key during greedy decoding is the needle token it "
           "copies) — and *causal*: masking the top 20 retrieval heads drops the needle score to 63.6 against 94.7 "
           "for 20 random heads, and at K = 50 (about 5% of heads) every model falls below 50. The paper's grid: "
           "20 context lengths from 1K to 50K tokens × 10 depths × 3 needle sets, on 7B-scale models with 1,024 "
           f"heads or more. Here: SmolLM2-135M ({n_heads} heads), lengths "
           f"{', '.join(map(str, params['lengths']))} × depths {', '.join(f'{d:g}%' for d in params['depths'])} × "
           f"needle sets {', '.join(map(str, params['needles']))} of `data/haystacks` (KJV haystack), greedy "
           f"decoding of up to {params['max_new_tokens']} tokens; a reply counts when its ROUGE-1 recall of the "
           f"needle exceeds {params['recall_threshold']}. Masking makes a head's attention {params['mask_how']} "
           f"(the paper's choice), during decoding, at {_lengths(params)} tokens.", ""]
    rows = [["heads scoring > 0.1", "3–6%", f"{_pct(meta['share_above_0_1'])}"],
            ["heads scoring > 0.5", "< 5%", f"{_pct(meta['share_above_0_5'])}"],
            ["trials that count (baseline)", "–", f"{meta['n_counted']} / {meta['n_trials']}"]]
    out += _table(["", "paper", "headlab, SmolLM2-135M"], rows)
    out += ["Top retrieval heads: " + ", ".join(f"{h} {_num(s, 2)}" for h, s in ranked[:10]) + ".", ""]

    out += _masking(records, params, n_heads) + _razor(records, params)
    n_kv = f" of {meta['n_layers'] * meta['n_kv_heads']}" if "n_kv_heads" in meta else ""
    out += [f"Retrieval KV heads kept full: {len(meta.get('retrieval_kv', []))}{n_kv} (layer, KV head) pairs. "
            f"Run time: {took}", "", f"Source: `{RETRIEVAL}/` (scores.json, records.json). Reproduce:", "",
            _fence(command, "bash"), ""]
    return out


def _masking(records: list[dict], params: dict, n_heads: int | None) -> list[str]:
    if not params["ks"]:
        return []
    lengths = params["mask_lengths"] or params["lengths"]
    at = lengths[0] if len(lengths) == 1 else None
    base_acc, base_found, base_n = _share(records, "baseline", at)
    out = [f"Masking K heads: needle score (mean ROUGE-1 recall × 100, as the paper reports it) and the share of "
            f"replies that count, over the {base_n} trials at {_lengths(params)} tokens; random: K heads drawn "
            f"outside the top {params['exclude_top']:.0%}, {params['draws']} draws (mean, and the range over draws). "
            f"Unmasked: {100 * base_acc:.1f} ({_pct(base_found)} count).", ""]
    rows = []
    for k in params["ks"]:
        top_acc, top_found, _ = _share(records, f"top{k}-{params['mask_how']}", at)
        draws = [_share(records, f"random{k}-{params['mask_how']}-{d}", at) for d in range(params["draws"])]
        accs = [d[0] for d in draws]
        rows.append([str(k), _pct(k / n_heads) if n_heads else "–", f"{100 * top_acc:.1f} ({_pct(top_found)})",
                     f"{100 * mean(accs):.1f} ({100 * min(accs):.1f}–{100 * max(accs):.1f}; "
                     f"{_pct(mean(d[1] for d in draws))})"])
    out += _table(["K", "share of heads", "top-K masked: score (replies that count)",
                   "random K masked: score (range; replies that count)"], rows)
    out += ["Paper, K = 20 (about 2% of a 7B model's heads): top-K 63.6, random-K 94.7.", ""]
    return out


def _razor(records: list[dict], params: dict) -> list[str]:
    if not params["windows"]:
        return []
    out = ["**RazorAttention** (claim: > 70% KV reduction, \"nearly lossless\"; the paper keeps S0 = 4000 recent "
            "tokens, a fixed 256 in their deployment code, with retrieval heads = top 14% by induction score ∪ top 1% by echo score keeping the full cache): "
            "the same heads from headlab's echo/induction scan keep their full KV cache, the others 4 sink tokens, "
            "a recent window and one compensation token; the control gives every head the window. Over all "
            f"{_share(records, 'baseline')[2]} trials ({' and '.join(map(str, params['lengths']))} tokens):", ""]
    rows = []
    for w in params["windows"]:
        razor = [r for r in records if r["condition"] == f"razor-w{w}"]
        kv = mean(r["kv"]["fraction"] for r in razor) if razor and "kv" in razor[0] else None
        r_acc, r_found, _ = _share(records, f"razor-w{w}")
        c_acc, c_found, _ = _share(records, f"window-w{w}")
        rows.append([str(w), "–" if kv is None else _pct(kv), f"{100 * r_acc:.1f} ({_pct(r_found)})",
                     f"{100 * c_acc:.1f} ({_pct(c_found)})"])
    full_acc, full_found, _ = _share(records, "baseline")
    rows.append(["full cache", "100.0%", f"{100 * full_acc:.1f} ({_pct(full_found)})", "–"])
    return out + _table(["recent window S0", "KV kept (mean)", "Razor: score (replies that count)",
                         "window only, no head kept full"], rows)


def _lengths(params: dict) -> str:
    return " and ".join(map(str, params["mask_lengths"] or params["lengths"]))


def _ranked_heads(scores: dict) -> list[tuple[str, float]]:
    """(L<layer>H<head>, score) of every head, highest retrieval score first."""
    grid = scores["maps"][scores["primary"]]
    flat = [(f"L{layer}H{head}", v) for layer, row in enumerate(grid) for head, v in enumerate(row)]
    return sorted(flat, key=lambda t: -t[1])


def pruning_section() -> list[str]:
    if not (ROOT / PRUNE / "command.json").exists():  # written when the run has finished
        return []
    run = _read(f"{PRUNE}/run.json")
    params = run["params"]
    rows = [json.loads(line) for line in (ROOT / PRUNE / "results.jsonl").read_text().splitlines() if line.strip()]
    command, took = _command(PRUNE)
    rankers = list(dict.fromkeys(r["ranker"] for r in rows))
    n_heads = rows[0]["n_heads"]
    out = ["## Head pruning on SmolLM2-135M", "",
           "**Claim** (Michel, Levy & Neubig 2019, *Are Sixteen Heads Really Better than One?* — recalled, not "
           "in shared/ALGORITHMS.md ⚠): many heads can be removed at test time with little loss (about 20% of a "
           "WMT Transformer's heads and 40% of BERT's before a noticeable drop), and heads ranked by an importance "
           "score can be pruned further than heads taken at random. Their importance score is the absolute "
           "first-order (gradient × gate) estimate; headlab's `atp` ranker is the same estimate for zeroing a "
           "head's output but *signed* (the most negative — heads whose removal is predicted to lower the loss — "
           "go first), and `ablation` measures the loss change exactly, one forward per head, on KJV Genesis "
           f"({params['rank']['windows']} × {params['rank']['ctx']} tokens). `induction` and `sink` rank by the "
           "induction scan's maps; the `scores:` ranker by the retrieval scan above (most heads score 0 and tie, "
           "so ties go by (layer, head): the early layers first). Heads are removed least important first, "
           f"out of {n_heads}; removal is zero ablation (`--save-model` removes "
           "them for real and is checked against it). No fine-tuning after pruning.", ""]
    for spec in dict.fromkeys(r["eval"] for r in rows):
        sub = [r for r in rows if r["eval"] == spec]
        primary = sub[0]["primary"]
        fractions = sorted({r["fraction"] for r in sub})
        value = {(r["ranker"], r["fraction"]): r["value"] for r in sub}
        what = ("held-out perplexity of " + spec.split(":", 1)[1] + f" ({params['windows']} × {params['ctx']} tokens)"
                if spec.startswith("ppl:") else
                f"loss on the second copy of `[BOS] r r` (random blocks of {params['task_seq_len']} tokens)")
        out += [f"`{spec}`: {primary}, {what}; lower is better. Columns: the ranker; rows: the share of heads "
                "removed.", ""]
        out += _table(["removed", "heads", *[f"`{r}`" for r in rankers]],
                      [[f"{f:.0%}", str(round(f * n_heads)), *[_num(value.get((r, f)), 2) for r in rankers]]
                       for f in fractions])
        out += [_change_at(sub, rankers, primary), ""]
    cmp_path = ROOT / PRUNE / "atp_vs_ablation.json"
    if cmp_path.exists():
        c = json.loads(cmp_path.read_text())
        out += [f"AtP against exhaustive ablation over {c['heads']} heads: Spearman {_num(c['spearman'])}, top-"
                f"{c['k']} overlap {_pct(c['top_k_overlap'])}"
                + (f", {_num(c['speedup'], 1)}× faster ({_num(c['atp_seconds'], 1)} s against "
                   f"{_num(c['ablation_seconds'], 1)} s)" if c.get("speedup") else "") + ".", ""]
    out += [f"Run time: {took}", "", f"Source: `{PRUNE}/results.jsonl`. Reproduce:", "", _fence(command, "bash"), ""]
    return out


def _change_at(rows: list[dict], rankers: list[str], primary: str, shares: tuple[float, ...] = (0.1, 0.2)) -> str:
    """Each ranker's change of the metric against the unpruned model at the given shares of heads removed."""
    base = next((r["value"] for r in rows if r["fraction"] == 0), None)
    value = {(r["ranker"], r["fraction"]): r["value"] for r in rows}
    shares = tuple(f for f in shares if any(abs(f - r["fraction"]) < 1e-9 for r in rows))
    if base is None or not shares:
        return ""

    def at(name: str, f: float) -> str:
        v = next((v for (n, g), v in value.items() if n == name and abs(g - f) < 1e-9), None)
        return "–" if v is None else f"{100 * (v / base - 1):+.0f}%"

    return (f"Change of the {primary} against the unpruned {_num(base, 2)} with "
            + " / ".join(f"{f:.0%}" for f in shares) + " of the heads removed: "
            + "; ".join(f"`{n}` " + " / ".join(at(n, f) for f in shares) for n in rankers) + ".")
