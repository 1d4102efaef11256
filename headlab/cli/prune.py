"""`headlab prune`: rank heads, remove them progressively, evaluate, plot (resumable); save a pruned model."""

from __future__ import annotations

import json
from pathlib import Path

from headlab.cli.common import (add_executor_args, add_model_args, count, executor_from_args, load_model, natural,
                                split_list)


def register(subparsers) -> None:
    """Add the `prune` command to the `headlab` parser's subcommands."""
    p = subparsers.add_parser(
        "prune", help="head-pruning curves: rank heads, remove the least important first, evaluate",
        description="Rank every head, zero-ablate the lowest-ranked fraction (least important first), evaluate "
                    "each (ranker, fraction, eval) and write results.jsonl, run.json and curve_*.html into --out. "
                    "Rerunning with the same --out skips finished rows.")
    add_model_args(p)
    p.add_argument("--rank-by", action="append", required=True, metavar="RANKER",
                   help="induction, sink, ablation, atp, random, or scores:PATH[:MAP] (a saved HeadScores "
                        "folder, e.g. retrieval scores); comma-separated or repeated")
    p.add_argument("--fractions", default="0,0.1,0.25,0.5",
                   help="fractions of heads to remove, e.g. 0,0.05,...,0.5 ('...' continues the step)")
    p.add_argument("--eval", action="append", required=True, metavar="SPEC",
                   help="ppl:FILE (held-out perplexity) or task:induction; comma-separated or repeated")
    p.add_argument("--out", required=True, type=Path, help="results folder (reused on a rerun)")
    p.add_argument("--ctx", type=count, default=128, help="tokens per held-out text window")
    p.add_argument("--windows", type=count, default=8, help="held-out text windows")
    p.add_argument("--task-seed", type=natural, default=1, help="token seed of task evals")
    p.add_argument("--task-seq-len", type=count, default=32,
                   help="block length N of task:induction ([BOS] r r, 1 + 2N tokens), eval and calibration")
    p.add_argument("--calib", default=None,
                   help="calibration eval for ablation/atp (default: ppl:data/text/kjv-genesis-1-15.txt, or "
                        "task:induction for models without a tokenizer)")
    p.add_argument("--calib-ctx", type=count, default=64, help="tokens per calibration window")
    p.add_argument("--calib-windows", type=count, default=4, help="calibration windows")
    p.add_argument("--seed", type=natural, default=0, help="seed of the random ranker and the induction scan")
    p.add_argument("--scan-seq-len", type=count, default=32, help="induction scan block length")
    p.add_argument("--scan-batch", type=count, default=8, help="induction scan sequences")
    p.add_argument("--save-model", default=None, metavar="RANKER:FRACTION",
                   help="also remove that ranker's heads at that fraction for real and save the smaller model "
                        "under OUT/pruned-RANKER-FRACTION/ (checked against the masked model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_executor_args(p, units="the (heads removed, eval) units")
    p.set_defaults(handler=cmd_prune)


def cmd_prune(args) -> int:
    """Run the experiment the arguments describe and print its table."""
    from headlab.errors import HeadlabError
    from headlab.prune.experiment import PruneParams, parse_fractions, prune_experiment
    from headlab.prune.experiment import slug
    from headlab.prune.rankers import RankParams
    from headlab.prune.structural import prune_and_save

    params = PruneParams(
        rankers=split_list(args.rank_by), fractions=parse_fractions(args.fractions), evals=split_list(args.eval),
        ctx=args.ctx, windows=args.windows, task_seed=args.task_seed, task_seq_len=args.task_seq_len,
        rank=RankParams(calib=args.calib, ctx=args.calib_ctx, windows=args.calib_windows, seed=args.seed,
                        calib_seq_len=args.task_seq_len,
                        scan_seq_len=args.scan_seq_len, scan_batch=args.scan_batch),
    )
    save = None
    if args.save_model:
        ranker, _, fraction = args.save_model.rpartition(":")
        if ranker not in params.rankers:
            raise HeadlabError(f"--save-model {args.save_model}: {ranker!r} is not among --rank-by (RANKER:FRACTION)")
        try:
            frac = float(fraction)
        except ValueError:
            raise HeadlabError(f"--save-model {args.save_model}: {fraction!r} is not a fraction (RANKER:FRACTION)") \
                from None
        if not 0 < frac <= 1:
            raise HeadlabError(f"--save-model {args.save_model}: the fraction must lie in (0, 1]")
        save = (ranker, frac)
    executor = executor_from_args(args)  # checked before the model loads
    model = load_model(args)
    result = prune_experiment(model, params, args.out, progress=not args.no_progress, executor=executor)
    for spec in params.evals:
        table = result.table(spec)
        metric = next(r["primary"] for r in result.rows if r["eval"] == spec)
        print(f"\n{spec}: {metric} by fraction of heads removed (least important first)")
        print("  " + f"{'ranker':>12}" + "".join(f"{f:>9.3f}" for f in params.fractions))
        for ranker in params.rankers:
            values = table.get(ranker, {})
            print("  " + f"{ranker[:12]:>12}" + "".join(f"{values.get(f, float('nan')):>9.3f}"
                                                        for f in params.fractions))
    if result.atp_vs_ablation:
        c = result.atp_vs_ablation
        speed = f", speed-up {c['speedup']:.1f}× ({c['ablation_seconds']:.1f} s vs {c['atp_seconds']:.2f} s)" \
            if "speedup" in c else ""
        print(f"\nAtP vs exhaustive ablation: Spearman {c['spearman']:.3f}, "
              f"top-{c['k']} overlap {c['top_k_overlap']:.2f}{speed}")
    if save is not None:
        ranker, fraction = save
        heads = result.mask(ranker, fraction)
        folder = result.out / f"pruned-{slug(ranker)}-{fraction:g}"
        print(json.dumps(prune_and_save(model, heads, folder), indent=1))
    print(f"wrote {args.out}/ (results.jsonl, run.json, rankings/, curve_*.html)")
    return 0
