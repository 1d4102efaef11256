"""`headlab scan induction | sinks | retrieval`: score every head of a model and write a report folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from headlab.cli.common import (add_executor_args, add_model_args, add_rule_args, count, executor_from_args, load_model,
                                natural, percent, rule_from_args, unit, write_figure)


def register(sub) -> None:
    scan = sub.add_parser("scan", help="score every head of a model")
    scan_sub = scan.add_subparsers(dest="analysis", required=True)

    ind = scan_sub.add_parser("induction", help="previous-token, induction and first-token scores on [BOS] r r")
    add_model_args(ind)
    ind.add_argument("--out", required=True, type=Path, help="report folder to write")
    ind.add_argument("--seq-len", type=count, default=50, help="length N of the random block")
    ind.add_argument("--batch", type=count, default=16, help="number of random sequences")
    ind.add_argument("--seed", type=natural, default=0)
    ind.add_argument("--top", type=count, default=10, help="how many top heads to print")
    ind.set_defaults(handler=cmd_scan_induction)

    sinks = scan_sub.add_parser("sinks", help="attention sinks of every head: column scores, first and later sinks")
    add_model_args(sinks)
    sinks.add_argument("--out", required=True, type=Path, help="report folder to write")
    sinks.add_argument("--prompts", type=Path, default=None,
                       help="a .txt file (prompts separated by blank lines) or a .json list; default: bundled KJV "
                            "passages")
    sinks.add_argument("--n-prompts", type=count, default=8)
    sinks.add_argument("--max-tokens", type=count, default=160)
    sinks.add_argument("--no-bos", action="store_true", help="do not prepend BOS on causal models")
    add_rule_args(sinks, min_visible=32)
    sinks.add_argument("--force", action="store_true", help="recompute even if --out holds this scan already")
    sinks.set_defaults(handler=cmd_scan_sinks)

    from headlab.analyses.retrieval import RetrievalParams

    d = RetrievalParams()
    ret = scan_sub.add_parser("retrieval", help="retrieval heads (needle copy-paste), head masking and "
                              "RazorAttention's KV cache on a needle grid; reruns resume")
    add_model_args(ret, help="bundled name or a local HF folder (with a tokenizer)")
    ret.add_argument("--out", required=True, type=Path, help="report folder; its trials.jsonl makes a rerun resume")
    for name, kind, default, nargs, what in (
            ("lengths", count, d.lengths, "*", "prompt lengths in tokens"),
            ("depths", percent, d.depths, "*", "needle depths in percent"),
            ("needles", natural, d.needles, "*", "needle sets of data/haystacks/needles.json"),
            ("ks", count, d.ks, "*", "K heads masked, top-K vs random-K (none: no masking test)"),
            ("mask-lengths", count, d.mask_lengths, "*", "lengths of the masking test (default: all)"),
            ("windows", count, d.windows, "*", "RazorAttention recent windows S0 (none: no KV-cache test)"),
            ("window-frac", unit, d.window_frac, None, "1/C: the window is max(S0, frac × prompt length)"),
            ("draws", count, d.draws, None, "random K-head draws per K"),
            ("max-new-tokens", count, d.max_new_tokens, None, "greedy decoding budget per reply"),
            ("razor-block", count, d.razor.block, None, "random tokens per repeat of the echo/induction input"),
            ("seed", natural, d.seed, None, "seed of the random-head draws")):
        ret.add_argument(f"--{name}", type=kind, nargs=nargs, default=list(default) if nargs else default, help=what)
    ret.add_argument("--mask-how", default=d.mask_how, choices=["uniform", "zero"])
    ret.add_argument("--kv-cache", default=d.kv_cache, choices=["simulated", "real", "both"],
                     help="RazorAttention as an edit over the full cache (simulated), as a real compressed cache "
                          "(real: only the kept entries in memory), or both side by side")
    add_executor_args(ret, units="the needle trials")
    ret.set_defaults(handler=cmd_scan_retrieval)


def cmd_scan_induction(args: argparse.Namespace) -> int:
    from headlab.analyses.induction import InductionParams, induction_scan

    model = load_model(args)
    start = time.perf_counter()
    scores = induction_scan(model, InductionParams(seq_len=args.seq_len, batch=args.batch, seed=args.seed))
    scores.meta["seconds"] = round(time.perf_counter() - start, 2)
    out = scores.save(args.out)
    for key in scores.maps:
        write_figure(scores.figure(key), out / f"heatmap_{key}.html")
    best = scores.top(1)[0][0]
    run = model.run(scores.items["tokens"][:1], heads=[best])
    write_figure(run.figure(best, title=f"{best} on [BOS] r r — {model.name}"), out / f"pattern_{best}.html")

    print(f"\ntop {args.top} heads by induction score ({model.name}, N={args.seq_len}, {args.batch} sequences):")
    print(f"  {'head':>8}  {'induction':>9}  {'prev-token':>10}  {'first-token':>11}")
    for head, value in scores.top(args.top):
        prev = float(scores.maps["prev_token"][head.layer, head.head])
        first = float(scores.maps["first_token"][head.layer, head.head])
        print(f"  {str(head):>8}  {value:9.3f}  {prev:10.3f}  {first:11.3f}")
    prev_best = ", ".join(f"{h} {v:.3f}" for h, v in scores.top(3, map="prev_token"))
    print(f"top previous-token heads: {prev_best}")
    if "loss_first_copy" in scores.meta:
        print(f"loss first copy {scores.meta['loss_first_copy']:.3f}, second copy "
              f"{scores.meta['loss_second_copy']:.3f}")
    print(f"wrote {out}/ (scores.json, items.safetensors, heatmaps, pattern) in {scores.meta['seconds']} s")
    return 0


def cmd_scan_sinks(args: argparse.Namespace) -> int:
    """Run (or reload) a sink scan, write its figures and print what it found."""
    from headlab.analyses.sinks import SinkParams, column_figure, read_prompts, sink_scan, summary_lines
    from headlab.results import HeadScores, params_dict

    params = SinkParams(rule=rule_from_args(args), n_prompts=args.n_prompts, max_tokens=args.max_tokens,
                        prepend_bos=not args.no_bos)
    out = args.out
    if not args.force and HeadScores.saved(out):
        done = HeadScores.load(out)
        if done.params == params_dict(params) and done.meta.get("source") == str(args.prompts or "kjv"):
            print(f"{out} holds this scan already (--force to redo):")
            print("\n".join(summary_lines(done)))
            return 0
    model = load_model(args, show=False)
    print(model)
    scores = sink_scan(model, read_prompts(args.prompts, args.n_prompts), params)
    scores.meta["source"] = str(args.prompts or "kjv")
    scores.save(out)
    for key in ("sink_share", "first_score", "later_share"):
        write_figure(scores.figure(key), out / f"heatmap_{key}.html")
    for key in ("later_share", "first_score"):
        head = scores.top(1, map=key)[0][0]
        write_figure(column_figure(scores, head), out / f"column_{key}_{head}.html")
    print("\n".join(summary_lines(scores)))
    print(f"wrote {out}/ in {scores.meta['seconds']} s")
    return 0


def cmd_scan_retrieval(args: argparse.Namespace) -> int:
    """Run `retrieval_scan` and print the top heads and the needle recall of each condition."""
    from headlab.analyses.razor import RazorParams
    from headlab.analyses.retrieval import RetrievalParams, retrieval_scan

    executor = executor_from_args(args)  # checked before the model loads
    model = load_model(args, show=False)
    print(model)
    params = RetrievalParams(lengths=tuple(args.lengths), depths=tuple(args.depths), needles=tuple(args.needles),
                             max_new_tokens=args.max_new_tokens, ks=tuple(args.ks), draws=args.draws,
                             mask_lengths=tuple(args.mask_lengths),
                             mask_how=args.mask_how, windows=tuple(args.windows), window_frac=args.window_frac,
                             kv_cache=args.kv_cache, razor=RazorParams(block=args.razor_block), seed=args.seed)
    report = retrieval_scan(model, params, out=args.out, executor=executor)
    meta = report.scores.meta
    print(f"\n{meta['n_counted']}/{meta['n_trials']} trials recalled the needle; heads with retrieval score "
          f"> 0.1: {meta['share_above_0_1']:.1%}, > 0.5: {meta['share_above_0_5']:.1%}")
    print("top heads: " + ", ".join(f"{h} {v:.3f}" for h, v in report.scores.top(10)))
    print(f"\n  {'condition':<22} {'recall':>6} {'found':>6} {'KV kept':>7} {'n':>4}")
    for name, row in report.summary.items():
        print(f"  {name:<22} {row['accuracy']:6.3f} {row['found']:6.1%} {row['kv_fraction']:7.1%} {row['n']:4d}")
    print(f"wrote {args.out}/ in {meta['seconds']} s")
    return 0
