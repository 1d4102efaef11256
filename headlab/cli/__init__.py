"""The `headlab` command: `explore`, `scan induction|sinks|retrieval`, `calibrate`, `icl train`, `prune`, `train twins`, `info`; each subcommand sets its own handler."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from headlab.errors import HeadlabError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled name (smollm2-135m, minilm-l6, toy-induction) or a local HF folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headlab", description="Study, score and edit attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a model's head geometry")
    _add_model_args(info)
    info.set_defaults(handler=cmd_info)

    scan = sub.add_parser("scan", help="score every head of a model")
    scan_sub = scan.add_subparsers(dest="analysis", required=True)
    ind = scan_sub.add_parser("induction", help="previous-token, induction and first-token scores on [BOS] r r")
    _add_model_args(ind)
    ind.add_argument("--out", required=True, type=Path, help="report folder to write")
    ind.add_argument("--seq-len", type=int, default=50, help="length N of the random block")
    ind.add_argument("--batch", type=int, default=16, help="number of random sequences")
    ind.add_argument("--seed", type=int, default=0)
    ind.add_argument("--top", type=int, default=10, help="how many top heads to print")
    ind.set_defaults(handler=cmd_scan_induction)

    from headlab.analyses.sinks import add_scan_sinks, register as register_sinks

    add_scan_sinks(scan_sub)

    from headlab.analyses.retrieval import add_scan_retrieval

    add_scan_retrieval(scan_sub)

    from headlab.explore import register as register_explore

    register_explore(sub)
    register_sinks(sub)

    from headlab.icl.cli import register as register_icl

    register_icl(sub)

    from headlab.prune.cli import register as register_prune

    register_prune(sub)

    from headlab.models.linear.cli import register as register_train

    register_train(sub)
    return parser


def _load(args):
    import headlab as hl

    return hl.load(args.model, device=args.device, dtype=args.dtype)


def cmd_info(args) -> int:
    print(_load(args))
    return 0


def cmd_scan_induction(args) -> int:
    from headlab import viz
    from headlab.analyses.induction import InductionParams, induction_scan

    model = _load(args)
    print(model)
    start = time.perf_counter()
    scores = induction_scan(model, InductionParams(seq_len=args.seq_len, batch=args.batch, seed=args.seed))
    scores.meta["seconds"] = round(time.perf_counter() - start, 2)
    out = scores.save(args.out)
    for key in scores.maps:
        scores.figure(key).write_html(out / f"heatmap_{key}.html", include_plotlyjs="cdn")
    best = scores.top(1)[0][0]
    run = model.run(scores.items["tokens"][:1], heads=[best])
    viz.pattern(run, best, title=f"{best} on [BOS] r r — {model.name}").write_html(
        out / f"pattern_{best}.html", include_plotlyjs="cdn")

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except HeadlabError as err:
        print(f"headlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
