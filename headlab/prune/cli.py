"""`headlab prune`: rank heads, remove them progressively, evaluate, plot (resumable); save a pruned model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _split(values: list[str]) -> tuple[str, ...]:
    """Repeated and/or comma-separated values → a tuple without duplicates, in order."""
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return tuple(dict.fromkeys(out))


def register(subparsers) -> None:
    """Add the `prune` command to the `headlab` parser's subcommands."""
    p = subparsers.add_parser(
        "prune", help="head-pruning curves: rank heads, remove the least important first, evaluate",
        description="Rank every head, zero-ablate the lowest-ranked fraction (least important first), evaluate "
                    "each (ranker, fraction, eval) and write results.jsonl, run.json and curve_*.html into --out. "
                    "Rerunning with the same --out skips finished rows.")
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, toy-induction, ...) or a local HF folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank-by", action="append", required=True, metavar="RANKER",
                   help="induction, sink, ablation, atp, random, or scores:PATH[:MAP] (a saved HeadScores "
                        "folder, e.g. retrieval scores); comma-separated or repeated")
    p.add_argument("--fractions", default="0,0.1,0.25,0.5",
                   help="fractions of heads to remove, e.g. 0,0.05,...,0.5 ('...' continues the step)")
    p.add_argument("--eval", action="append", required=True, metavar="SPEC",
                   help="ppl:FILE (held-out perplexity) or task:induction; comma-separated or repeated")
    p.add_argument("--out", required=True, type=Path, help="results folder (reused on a rerun)")
    p.add_argument("--ctx", type=int, default=128, help="tokens per held-out text window")
    p.add_argument("--windows", type=int, default=8, help="held-out text windows")
    p.add_argument("--task-seed", type=int, default=1, help="token seed of task evals")
    p.add_argument("--task-seq-len", type=int, default=32,
                   help="block length N of task:induction ([BOS] r r, 1 + 2N tokens), eval and calibration")
    p.add_argument("--calib", default=None,
                   help="calibration eval for ablation/atp (default: ppl:data/text/kjv-genesis-1-15.txt, or "
                        "task:induction for models without a tokenizer)")
    p.add_argument("--calib-ctx", type=int, default=64, help="tokens per calibration window")
    p.add_argument("--calib-windows", type=int, default=4, help="calibration windows")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ranker and the induction scan")
    p.add_argument("--scan-seq-len", type=int, default=32, help="induction scan block length")
    p.add_argument("--scan-batch", type=int, default=8, help="induction scan sequences")
    p.add_argument("--save-model", default=None, metavar="RANKER:FRACTION",
                   help="also remove that ranker's heads at that fraction for real and save the smaller model "
                        "under OUT/pruned-RANKER-FRACTION/ (checked against the masked model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_prune)


def cmd_prune(args) -> int:
    """Run the experiment the arguments describe and print its table."""
    import headlab as hl
    from headlab.errors import HeadlabError
    from headlab.prune.experiment import PruneParams, parse_fractions, prune_experiment
    from headlab.prune.rankers import RankParams

    params = PruneParams(
        rankers=_split(args.rank_by), fractions=parse_fractions(args.fractions), evals=_split(args.eval),
        ctx=args.ctx, windows=args.windows, task_seed=args.task_seed, task_seq_len=args.task_seq_len,
        rank=RankParams(calib=args.calib, ctx=args.calib_ctx, windows=args.calib_windows, seed=args.seed,
                        calib_seq_len=args.task_seq_len,
                        scan_seq_len=args.scan_seq_len, scan_batch=args.scan_batch),
    )
    save = None
    if args.save_model:
        ranker, _, fraction = args.save_model.rpartition(":")
        if ranker not in params.rankers:
            raise HeadlabError(f"--save-model {args.save_model}: {ranker!r} is not among --rank-by")
        save = (ranker, float(fraction))
    model = hl.load(args.model, device=args.device, dtype=args.dtype)
    print(model)
    if model.note:
        print(f"note: {model.note}")
    result = prune_experiment(model, params, args.out, progress=not args.no_progress)
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
        print(json.dumps(_save_model(model, result, *save), indent=1))
    print(f"wrote {args.out}/ (results.jsonl, run.json, rankings/, curve_*.html)")
    return 0


def _save_model(model, result, ranker: str, fraction: float) -> dict:
    """Remove a ranker's heads at a fraction for real, save the model, check it against the masked one."""
    import torch

    from headlab.prune.costs import compare, equality
    from headlab.prune.experiment import slug
    from headlab.prune.rankers import n_to_remove, prune_order
    from headlab.prune.structural import load_pruned, remove_heads, save_pruned

    heads = prune_order(result.rankings[ranker].scores)[:n_to_remove(fraction, model.n_layers * model.n_heads)]
    folder = result.out / f"pruned-{slug(ranker)}-{fraction:g}"
    save_pruned(remove_heads(model, heads), folder)
    loaded = load_pruned(folder, device=model.device, dtype=model.dtype)
    ids = torch.randint(model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    check = equality(model, loaded, heads, ids)
    report = {"folder": str(folder), "removed": len(heads),
              "equal_to_1e-5_in_float64": check["max_abs_diff_float64"] < 1e-5,
              **{f"vs_masked_{k}": v for k, v in check.items()}, **compare(model, loaded)}
    (folder / "prune_report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m headlab.prune.cli ...`: the same as `headlab prune ...`."""
    from headlab.cli import main as headlab_main

    return headlab_main(["prune", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
