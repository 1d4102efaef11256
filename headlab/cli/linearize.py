"""`headlab linearize build | analyse`: a pretrained model linearized head by head (Hedgehog attention transfer), and
what that does to each head and to the model as the hardest heads stay softmax."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.cli.common import add_model_args, count, load_model, positive, split_list, write_figure


def _default_out(model: str) -> Path:
    from headlab.models.smollm2 import _cache_root

    return _cache_root(None) / "models" / f"{Path(model).name}-hedgehog"


def register(sub) -> None:
    from headlab.linearize import TransferParams
    from headlab.linearize.analysis import HybridParams

    t, h = TransferParams(), HybridParams()
    p = sub.add_parser("linearize", help="linearize a Llama-family model head by head (Hedgehog attention transfer) "
                                         "and analyse it")
    group = p.add_subparsers(dest="linearize_command", required=True)

    b = group.add_parser("build", help="train every head's feature map by attention transfer, base frozen "
                                       "(resumable layer by layer); writes an HF folder")
    add_model_args(b)
    b.add_argument("--out", type=Path, default=None, help="build folder (default: the user cache, "
                                                         "models/<model>-hedgehog); the model lands in <out>/model")
    b.add_argument("--steps", type=count, default=t.steps, help="AdamW steps per layer")
    b.add_argument("--windows", type=count, default=t.windows, help="training windows of the text")
    b.add_argument("--seq-len", type=count, default=t.seq_len, help="tokens per window")
    b.add_argument("--feature-dim", type=count, default=t.feature_dim, help="Hedgehog features per sign")
    b.add_argument("--lr", type=positive, default=t.lr)
    b.add_argument("--text", type=Path, default=Path(t.text), help="training text (offline)")
    b.add_argument("--threads", type=count, default=1, help="torch CPU threads")
    b.set_defaults(handler=cmd_build)

    a = group.add_parser("analyse", help="per-head transfer error against head types; perplexity and needle recall "
                                         "as the k hardest heads stay softmax (resumable)")
    add_model_args(a)
    a.add_argument("--linearized", required=True, type=Path, help="the model folder `linearize build` wrote")
    a.add_argument("--out", required=True, type=Path, help="report folder")
    a.add_argument("--ks", default=",".join(map(str, h.ks)), help="numbers of heads kept softmax")
    a.add_argument("--retrieval", type=Path, default=None, help="a saved retrieval scan of the base "
                                                               "(`headlab scan retrieval --out`) to relate to")
    a.add_argument("--needle-lengths", default=",".join(map(str, h.needle_lengths)),
                   help="needle prompt lengths ('' for no needle test)")
    a.add_argument("--windows", type=count, default=h.windows, help="held-out windows for perplexity")
    a.add_argument("--rank-by", default=h.rank_by, help="which heads stay softmax first: a map of the transfer "
                                                         "report (rel_error, kl, entropy, induction, retrieval, ...)")
    a.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    a.set_defaults(handler=cmd_analyse)


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or resume) a linearized model and print its folder."""
    import torch

    from headlab.linearize import TransferParams, build_linearized
    from headlab.linearize.transfer import build_info

    torch.set_num_threads(args.threads)
    params = TransferParams(feature_dim=args.feature_dim, text=str(args.text), windows=args.windows,
                            seq_len=args.seq_len, steps=args.steps, lr=args.lr)
    out = args.out or _default_out(args.model)
    args.out = out
    model = load_model(args)
    folder = build_linearized(model, out, params)
    info = build_info(out)
    ends = [row["curve"][-1] for row in info["layers"]]
    print(f"linearized model: {folder}  (load it with hl.load({str(folder)!r}))")
    print(f"attention transfer: {info['stamp']['seconds']} s; training KL {sum(e[1] for e in ends) / len(ends):.4f}, "
          f"relative output error {sum(e[2] for e in ends) / len(ends):.4f} (means over layers)")
    return 0


def cmd_analyse(args: argparse.Namespace) -> int:
    """Transfer report, relation to head types, hybrid sweep; writes report.json, the maps and figures."""
    import torch

    import headlab as hl
    from headlab.errors import HeadlabError
    from headlab.linearize.analysis import HybridParams, hybrid_sweep, relate, transfer_report, type_maps
    from headlab.results import write_json

    torch.set_num_threads(args.threads)
    try:
        ks = tuple(int(k) for k in split_list(args.ks))
        lengths = tuple(int(n) for n in split_list(args.needle_lengths))
    except ValueError:
        raise HeadlabError(f"--ks {args.ks!r} / --needle-lengths {args.needle_lengths!r}: give integers") from None
    if not args.linearized.is_dir():
        raise HeadlabError(f"--linearized {args.linearized} is not a folder")
    base = load_model(args)
    lin = hl.load(str(args.linearized), device=args.device, dtype=args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    report_dir = args.out / "transfer"
    if (report_dir / "scores.json").exists():
        report = hl.results.HeadScores.load(report_dir)
    else:
        report = transfer_report(base, lin, types=type_maps(base, retrieval=args.retrieval))
        report.save(report_dir)
    rows = hybrid_sweep(lin, report, HybridParams(ks=ks, needle_lengths=lengths, windows=args.windows,
                                                  rank_by=args.rank_by), out=args.out)
    summary = {"relate": relate(report), "hardest": [[str(h), s] for h, s in report.top(12)], "hybrid": rows,
               "mean_rel_error": float(report.maps["rel_error"].mean()), "mean_kl": float(report.maps["kl"].mean())}
    write_json(args.out / "report.json", summary)
    write_figure(report.figure("rel_error"), args.out / "rel_error.html")
    print(json.dumps({k: summary[k] for k in ("mean_rel_error", "mean_kl", "relate")}, indent=1))
    for r in rows:
        extra = f", needle recall {r['recall']:.3f}" if "recall" in r else ""
        print(f"  k = {r['k']:3d} softmax heads ({r['softmax_share']:.1%}): ppl {r['ppl']:.2f}{extra}")
    return 0
