"""Structural pruning against the unpruned model: parameters, KV-cache bytes and forward time, as ratios.

Removes a fraction of heads (least important first by a ranker, AtP by default, or a saved ranking
folder), saves the smaller model, loads it back, checks that it gives the masked model's logits
(the same heads zero-ablated in an edit scope) on held-out text — in float64, where the two must be the
same function, and in the model's dtype, against that dtype's own rounding — then measures:
  params       all parameters, and attention parameters only (pruned / original)
  KV cache     bytes per token, from the layout and from a real cached forward
  prefill      median forward time at each length (paired, interleaved runs; batch 1)
  decode       median time per generated token with a KV cache (greedy, after a prompt)
Timings are medians on a shared machine; read the ratios, not the seconds. One intra-op thread by
default (`--threads`).

Usage: python benchmarks/prune.py [--model smollm2-135m] [--fraction 0.25] [--rank-by atp | --ranking DIR]
       [--lengths 128 512] [--repeats 5] [--decode 32] [--device cpu|cuda] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import headlab as hl
from headlab.prune import (
    TextEval,
    compare,
    equality,
    forward_seconds,
    load_pruned,
    measured_kv_bytes,
    n_to_remove,
    prune_order,
    pruned_layouts,
    rank,
    remove_heads,
    save_pruned,
)
from headlab.prune.evals import HELDOUT_TEXT
from headlab.results import HeadScores


@torch.no_grad()
def decode_seconds(models: dict[str, hl.HeadModel], *, prompt_len: int = 64, steps: int = 32,
                   repeats: int = 3) -> dict[str, float]:
    """Median seconds per greedily generated token (KV cache on), interleaved runs of each model."""
    first = next(iter(models.values()))
    ids = torch.randint(first.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(first.device)
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=first.pad_id)
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m.hf.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=first.pad_id)
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            m.hf.generate(ids, **kwargs)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of all heads to remove")
    ap.add_argument("--rank-by", default="atp", help="ranker (see headlab.prune.rankers)")
    ap.add_argument("--ranking", type=Path, default=None, help="a saved ranking folder to use instead")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="prefill lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=32, help="generated tokens per decode timing (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="where to save the pruned model (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = hl.load(args.model, device=args.device)
    print(model, f"— {model.note}" if model.note else "")
    ranking = HeadScores.load(args.ranking) if args.ranking else rank(model, args.rank_by)
    n_total = model.n_layers * model.n_heads
    heads = prune_order(ranking.scores)[:n_to_remove(args.fraction, n_total)]
    folder = args.out or Path(tempfile.mkdtemp(prefix="headlab-pruned-"))
    start = time.perf_counter()
    save_pruned(remove_heads(model, heads), folder)
    pruned = load_pruned(folder, device=args.device)
    build_s = time.perf_counter() - start

    text = TextEval(path=str(HELDOUT_TEXT), ctx=128, windows=2).tokens(model)
    check = equality(model, pruned, heads, text)
    diff = check["max_abs_diff_float64"]
    layouts = pruned_layouts(pruned)
    report = {
        "model": model.name, "weights_note": model.note, "ranking": ranking.analysis, "fraction": args.fraction,
        "removed_heads": len(heads), "n_heads": n_total, "folder": str(folder), "build_and_reload_s": round(build_s, 2),
        **{f"vs_masked_{k}": v for k, v in check.items()}, "equal_to_1e-5_in_float64": diff < 1e-5,
        "kv_groups_kept": sum(len(lay.kv) for lay in layouts), "kv_groups": model.n_layers * model.n_kv_heads,
        "empty_layers": sum(not lay.heads for lay in layouts),
        **compare(model, pruned),
        "measured_kv_ratio": measured_kv_bytes(pruned) / measured_kv_bytes(model),
        "threads": args.threads, "device": args.device,
    }
    for length in args.lengths:
        t = forward_seconds({"original": model, "pruned": pruned}, seq_len=length, repeats=args.repeats)
        report[f"prefill_{length}_s"] = {k: round(v["median_s"], 4) for k, v in t.items()}
        report[f"prefill_{length}_ratio"] = t["pruned"]["median_s"] / t["original"]["median_s"]
    if args.decode:
        d = decode_seconds({"original": model, "pruned": pruned}, steps=args.decode, repeats=max(1, args.repeats // 2))
        report["decode_s_per_token"] = {k: round(v, 5) for k, v in d.items()}
        report["decode_ratio"] = d["pruned"] / d["original"]

    print(f"\nremoved {len(heads)}/{n_total} heads ({args.fraction:.0%}, {ranking.analysis}); max |Δlogit| vs the "
          f"masked model: {diff:.1e} in float64, {check['max_abs_diff']:.1e} in {str(model.dtype)[6:]} (whose own "
          f"rounding is {check['rounding_of_masked']:.1e}; logits up to {check['logit_scale']:.0f})\n  KV groups kept {report['kv_groups_kept']}/{report['kv_groups']}, empty layers {report['empty_layers']}")
    print(f"  {'':24}{'ratio (pruned / original)':>28}")
    rows = [("parameters", report["params_ratio"]), ("attention parameters", report["attn_params_ratio"]),
            ("KV-cache bytes / token", report["kv_ratio"]), ("KV bytes, measured", report["measured_kv_ratio"])]
    rows += [(f"prefill T={n}", report[f"prefill_{n}_ratio"]) for n in args.lengths]
    if args.decode:
        rows.append(("decode, per token", report["decode_ratio"]))
    for name, value in rows:
        print(f"  {name:24}{value:>28.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if diff < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
