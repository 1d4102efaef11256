"""`headlab moh convert | train | analyse | twin`: mixture-of-head routing of a pretrained model (as an edit), against
static pruning; routers trained on offline text; routing analytics; the small MoH model against its MHA twin."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.cli.common import add_model_args, count, load_model, positive, split_list, write_figure


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in split_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated fractions, e.g. 0.5,0.67,1") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each active fraction must lie in (0, 1]")
    return values


def _active(text: str) -> float | int:
    """A fraction in (0, 1] (with a point) or a count (an integer)."""
    try:
        value = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the routed heads (0.67) or a count (4)") from None
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction in (0, 1] or a count >= 1")
    return value


def _add_router_args(p: argparse.ArgumentParser) -> None:
    from headlab.moh.train import RouterParams

    r = RouterParams()
    p.add_argument("--shared", type=int, default=None, help="shared heads per layer (default: half the KV groups' "
                                                           "heads)")
    p.add_argument("--steps", type=count, default=r.steps, help="router training steps")
    p.add_argument("--batch", type=count, default=r.batch, help="windows per router step")
    p.add_argument("--seq-len", type=count, default=r.seq_len, help="tokens per training window")
    p.add_argument("--lr", type=positive, default=r.lr, help="router learning rate (AdamW)")
    p.add_argument("--balance", type=float, default=r.balance, help="weight of MoH's load-balance term")
    p.add_argument("--train-text", type=Path, default=Path(r.text), help="training text (offline)")
    p.add_argument("--threads", type=count, default=2, help="torch CPU threads")


def _router_params(args: argparse.Namespace):
    from headlab.moh.train import RouterParams

    return RouterParams(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, balance=args.balance,
                        text=str(args.train_text))


def register(sub) -> None:
    from headlab.moh.convert import ConvertParams

    c = ConvertParams()
    p = sub.add_parser("moh", help="mixture-of-head routing: convert a model (vs static pruning), train routers, "
                                   "analyse routing, the MoH twin")
    group = p.add_subparsers(dest="moh_command", required=True)

    q = group.add_parser("convert", help="MoH conversion (query-norm and trained routers) vs static pruning of as "
                                         "many heads: held-out perplexity and task accuracy per active fraction "
                                         "(resumable)")
    add_model_args(q)
    q.add_argument("--out", required=True, type=Path, help="result folder; rerun the same command to resume")
    q.add_argument("--actives", type=_fractions, default=c.actives, help="routed heads on per token, as fractions")
    q.add_argument("--routers", default=",".join(c.routers), help="querynorm and/or trained")
    q.add_argument("--rankers", default=",".join(c.rankers), help="pruning rankers for the static baseline ('' for "
                                                                   "none)")
    q.add_argument("--heldout", type=Path, default=Path(c.heldout), help="held-out text for perplexity")
    q.add_argument("--windows", type=count, default=c.windows, help="held-out windows")
    q.add_argument("--ctx", type=count, default=c.ctx, help="tokens per held-out window")
    q.add_argument("--tasks", default=",".join(c.tasks), help="multiple-choice tasks ('' for none)")
    q.add_argument("--n-eval", type=count, default=c.n_eval, help="items per task")
    _add_router_args(q)
    q.set_defaults(handler=cmd_convert)

    t = group.add_parser("train", help="train one router (only its parameters) for k routed heads per token")
    add_model_args(t)
    t.add_argument("--active", type=_active, required=True, help="routed heads on per token: a fraction or a count")
    t.add_argument("--out", required=True, type=Path, help="router folder; rerun to resume")
    _add_router_args(t)
    t.set_defaults(handler=cmd_train)

    a = group.add_parser("analyse", help="routing analytics: frequency, load balance, entropy, token types, "
                                         "relation to other head scores")
    add_model_args(a)
    a.add_argument("--out", required=True, type=Path, help="result folder (routing, summary.json, figures)")
    a.add_argument("--active", type=_active, default=None, help="routed heads per token (omit for a model with its "
                                                                "own MoH layers)")
    a.add_argument("--shared", type=int, default=None, help="shared heads per layer")
    a.add_argument("--router", type=Path, default=None, help="a trained router folder (default: query-norm)")
    a.add_argument("--text", type=Path, default=None, help="text to route (default: the held-out KJV John)")
    a.add_argument("--windows", type=count, default=8, help="windows of the text")
    a.add_argument("--ctx", type=count, default=128, help="tokens per window")
    a.add_argument("--relate", default="induction,sinks", help="head scans to correlate routing with (induction, "
                                                              "sinks) or saved results NAME=FOLDER; '' for none")
    a.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    a.set_defaults(handler=cmd_analyse)

    w = group.add_parser("twin", help="train the small MoH model and its MHA twin (same data, steps, parameters "
                                      "within a few %%)")
    w.add_argument("--out", type=Path, default=None, help="folder (default: data/moh-twins)")
    w.add_argument("--steps", type=count, default=None, help="training steps (default: the recipe's)")
    w.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    w.set_defaults(handler=cmd_twin)


def cmd_convert(args: argparse.Namespace) -> int:
    """Run (or resume) a conversion sweep; print its table and write the figures."""
    import torch

    from headlab.moh.convert import ConvertParams, conversion_sweep

    torch.set_num_threads(args.threads)
    params = ConvertParams(actives=args.actives, shared=args.shared, routers=split_list(args.routers),
                           rankers=split_list(args.rankers), heldout=str(args.heldout), ctx=args.ctx,
                           windows=args.windows, tasks=split_list(args.tasks), n_eval=args.n_eval,
                           train=_router_params(args))
    if params.rankers:
        from headlab.prune.rankers import check_ranker

        for name in params.rankers:
            check_ranker(name)
    model = load_model(args)
    result = conversion_sweep(model, params, args.out)
    write_figure(result.figure("ppl"), args.out / "ppl.html")
    if params.tasks:
        write_figure(result.figure("acc"), args.out / "acc.html")
    (args.out / "table.md").write_text(result.markdown() + "\n")
    print(result.markdown())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) one router."""
    import torch

    import headlab as hl
    from headlab.moh.train import train_router

    torch.set_num_threads(args.threads)
    params = _router_params(args)
    moh = hl.MoH(active=args.active, shared=args.shared)
    model = load_model(args)
    _, state = train_router(model, moh, params, out=args.out)
    first, last = state["curve"][0], state["curve"][-1]
    print(f"router for k={state['k']} of {state['n_routed']} routed heads ({state['shared']} shared): task loss "
          f"{first[1]:.3f} -> {last[1]:.3f}, L_b {first[2]:.3f} -> {last[2]:.3f} in {state['seconds']} s")
    return 0


def cmd_analyse(args: argparse.Namespace) -> int:
    """Trace the routing of a text and write the analytics."""
    import torch

    import headlab as hl
    from headlab.errors import HeadlabError
    from headlab.moh.routing import trace
    from headlab.moh.train import load_router
    from headlab.prune.evals import HELDOUT_TEXT, TextEval
    from headlab.results import HeadScores, write_json
    from headlab.viz.moh import type_lifts

    torch.set_num_threads(args.threads)
    relate = split_list(args.relate)
    for name in relate:
        if "=" not in name and name not in ("induction", "sinks"):
            raise HeadlabError(f"--relate {name!r}: use induction, sinks, or NAME=FOLDER of a saved result")
    router = load_router(args.router)[0] if args.router is not None else None
    if router is not None and args.active is None:
        raise HeadlabError("--router needs --active (the k it was trained for)")
    model = load_model(args)
    moh = hl.MoH(active=args.active, shared=args.shared, router=router) if args.active is not None else None
    text = args.text or HELDOUT_TEXT
    tokens = TextEval(path=str(text), ctx=args.ctx, windows=args.windows).tokens(model)
    routing = trace(model, moh, list(tokens), progress=True)
    routing.save(args.out / "routing")
    maps = {}
    for name in relate:
        if "=" in name:
            label, folder = name.split("=", 1)
            saved = HeadScores.load(folder)
            maps[label] = saved.scores
        elif name == "induction":
            from headlab.analyses.induction import induction_scan

            maps["induction"] = induction_scan(model, progress=False).scores
        else:
            from headlab.analyses.sinks import sink_scan

            maps["sinks"] = sink_scan(model, progress=False).scores
    summary = {**routing.summary(), "load_balance": routing.load_balance(), "entropy": routing.entropy(),
               "by_type_full": routing.by_type(), "relate": routing.relate(maps) if maps else {}}
    write_json(args.out / "summary.json", summary)
    write_figure(routing.figure("frequency"), args.out / "frequency.html")
    write_figure(type_lifts(routing.by_type(top=3), title=f"routing by token type — {model.name}"),
                 args.out / "token_types.html")
    first = routing.scores.items["token_ids"][routing.scores.items["sequence"] == 0].tolist()
    write_figure(routing.token_figure(0, strings=model.token_strings(first)), args.out / "tokens.html")
    print(json.dumps({k: v for k, v in summary.items() if k in ("tokens", "shared", "k", "n_routed", "mean_L_b",
                                                                 "balanced_L_b", "mean_cv", "mean_token_entropy_share",
                                                                 "query_heads_on", "kv_groups_read", "relate")},
                     indent=1))
    for name, entry in summary["by_type"].items():
        if entry:
            print(f"  {name:14s} " + ", ".join(f"{h} (on {f:.0%}, lift {lift:.2f})" for h, f, lift in entry))
    return 0


def cmd_twin(args: argparse.Namespace) -> int:
    """Train the MoH model and its MHA twin (skipping those already trained) and print their comparison."""
    import torch

    from headlab.models.linear.train import train_moh_pair

    torch.set_num_threads(args.threads)
    kwargs = {} if args.steps is None else {"steps": args.steps}
    summary = train_moh_pair(args.out, progress=True, **kwargs) if args.out is not None else \
        train_moh_pair(progress=True, **kwargs)
    print(json.dumps(summary, indent=1))
    return 0
