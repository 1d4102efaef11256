"""`headlab circuit discover | compare`: a task's circuit by exact and path patching (resumable); reuse across tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.cli.common import add_model_args, check_out, count, load_model, natural, unit, write_figure


def register(sub) -> None:
    from headlab.circuits.circuit import DiscoverParams
    from headlab.tasks.circuits import CIRCUIT_TASKS

    d = DiscoverParams()
    p = sub.add_parser("circuit", help="circuits across tasks: discover one (patching), compare several (reuse)")
    group = p.add_subparsers(dest="circuit_command", required=True)

    q = group.add_parser("discover", help="exact patching of every head, roles, path-patching edges (resumable)")
    add_model_args(q)
    q.add_argument("--task", required=True, choices=CIRCUIT_TASKS, help="the task (data/circuits/<task>.json)")
    q.add_argument("--out", required=True, type=Path, help="result folder; rerun the same command to resume")
    q.add_argument("--n", type=count, default=d.n, help="prompt pairs")
    q.add_argument("--seed", type=natural, default=d.seed)
    q.add_argument("--fraction", type=unit, default=d.fraction, help="circuit = this fraction of heads by |effect|")
    q.add_argument("--no-edges", action="store_true", help="skip path patching between the circuit's heads")
    q.add_argument("--edge-prompts", type=count, default=d.edge_prompts, help="prompt pairs used for path patching")
    q.add_argument("--atp", action="store_true", help="also AtP and AtP* (with GradDrop), and their agreement with "
                                                      "exact patching")
    q.add_argument("--token-budget", type=count, default=d.token_budget, help="tokens per batched forward")
    q.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    q.set_defaults(handler=cmd_discover)

    r = group.add_parser("repair", help="Merullo et al.'s repair: one circuit's heads (e.g. IOI's inhibition heads) "
                                        "attend uniformly over another task's wrong answers at the last position")
    add_model_args(r)
    r.add_argument("--circuit", required=True, type=Path, help="a folder written by `headlab circuit discover`")
    r.add_argument("--roles", default="inhibition,negative mover", help="the circuit's roles whose heads are edited")
    r.add_argument("--heads", default=None, help="edit these heads instead (e.g. L12H3,L14H0)")
    r.add_argument("--task", default="colored_objects", choices=CIRCUIT_TASKS, help="the task to repair")
    r.add_argument("--wrong-positions", default="c1,c2,c3", help="the task's positions holding candidate answers")
    r.add_argument("--answer-position", default="answer_color", help="the position holding the right answer")
    r.add_argument("--n", type=count, default=200, help="prompts")
    r.add_argument("--seed", type=natural, default=0)
    r.add_argument("--out", required=True, type=Path, help="folder for repair.json")
    r.add_argument("--threads", type=count, default=2, help="torch CPU threads")
    r.set_defaults(handler=cmd_repair)

    c = group.add_parser("compare", help="overlap of circuits (IoU, shared share) against two null models")
    c.add_argument("folders", nargs="+", type=Path, help="folders written by `headlab circuit discover`")
    c.add_argument("--out", required=True, type=Path, help="folder for comparison.json and the figures")
    c.add_argument("--draws", type=count, default=10000, help="samples per null model")
    c.add_argument("--seed", type=natural, default=0)
    c.set_defaults(handler=cmd_compare)


def cmd_discover(args: argparse.Namespace) -> int:
    """Discover (or resume) a circuit and write its figures; print its heads."""
    import torch

    from headlab.circuits import DiscoverParams, agreement, atp, atp_star, discover, prepare
    from headlab.results import HeadScores, write_json
    from headlab.tasks.circuits import make_task
    from headlab.viz.circuits import estimate_scatter

    torch.set_num_threads(args.threads)
    params = DiscoverParams(n=args.n, seed=args.seed, fraction=args.fraction, edges=not args.no_edges,
                            edge_prompts=args.edge_prompts, token_budget=args.token_budget)
    model = load_model(args)
    task = make_task(args.task, model.tokenizer, args.n, seed=args.seed)
    circuit = discover(model, task, params=params, out=args.out)
    patching = HeadScores.load(args.out / "patching")
    write_figure(patching.figure(), args.out / "heatmap_effect.html")
    write_figure(circuit.figure(), args.out / "circuit.html")
    meta = circuit.meta
    print(f"{args.task}: accuracy clean {meta['accuracy_clean']:.3f} (LD {meta['ld_clean']:.2f}), corrupted "
          f"{meta['accuracy_corrupt']:.3f} (LD {meta['ld_corrupt']:.2f}); exact patching {meta['seconds_patching']} s")
    for h in circuit.heads:
        print(f"  {h.head}  effect {h.effect:+.3f}  direct {h.evidence['direct']:+.3f}  {h.role}")
    strong = sorted(circuit.edges, key=lambda e: -abs(e.effect))[:10]
    if strong:
        print("strongest edges: " + ", ".join(f"{e.sender}→{e.receiver}.{e.channel} {e.effect:+.3f}" for e in strong))
    if args.atp:
        prep = prepare(model, task)
        fast = {"atp": atp(model, prep), "atp_star": atp_star(model, prep)}
        report = {}
        for name, scores in fast.items():
            scores.save(args.out / name)
            report[name] = {"seconds": scores.meta["seconds"], **agreement(patching, scores)}
        report["atp_star_grad_drop"] = agreement(patching, fast["atp_star"], map="grad_drop")
        report["exact_seconds"] = patching.meta["seconds"]
        write_json(args.out / "agreement.json", report)
        write_figure(estimate_scatter(patching.maps["effect"], {"AtP": fast["atp"].maps["effect"],
                                                                 "AtP*": fast["atp_star"].maps["effect"]},
                                      title=f"{args.task}: estimates vs exact patching — {model.name}",
                                      labels=[str(h) for h in model.heads()]),
                     args.out / "atp_vs_exact.html")
        print(json.dumps(report, indent=1))
    print(f"wrote {args.out}/")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare circuits, write comparison.json and the overlap figures; print the tables."""
    from headlab.circuits import compare, overlap_matrix
    from headlab.viz.circuits import overlap_figure, shared_roles

    check_out(args.out)
    comparison = compare(args.folders, draws=args.draws, seed=args.seed, out=args.out)
    for fraction in sorted({p.fraction for p in comparison.pairs}):
        tag = f"{round(fraction * 100)}pct"
        m = overlap_matrix(comparison.pairs, comparison.tasks, fraction)
        write_figure(overlap_figure(m, comparison.tasks, title=f"circuit overlap (IoU), top {fraction:.0%} of heads"),
                     args.out / f"overlap_{tag}.html")
        print(f"top {fraction:.0%} of heads:")
        for row in comparison.table(fraction):
            print("  " + "  ".join(f"{k} {v}" for k, v in row.items()))
    rows = [r for r in comparison.meta["shared_roles"]]
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[(r["pair"] + f" @{r['fraction']:.0%}", r["role"])] = counts.get((r["pair"] + f" @{r['fraction']:.0%}",
                                                                                 r["role"]), 0) + 1
    write_figure(shared_roles([{"pair": p, "role": role, "count": n} for (p, role), n in counts.items()],
                              title="shared heads by role"), args.out / "shared_roles.html")
    print(f"wrote {args.out}/")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    """Run the repair on the chosen heads, print and save accuracies before / after / control."""
    import torch

    from headlab.circuits import Circuit
    from headlab.circuits.repair import repair
    from headlab.cli.common import choose, split_list
    from headlab.errors import HeadlabError
    from headlab.heads import as_heads
    from headlab.tasks.circuits import make_task

    torch.set_num_threads(args.threads)
    circuit = Circuit.load(args.circuit)
    if args.heads:
        heads = as_heads(list(split_list(args.heads)))
    else:
        roles = choose(args.roles, sorted({h.role for h in circuit.heads} | {"inhibition", "negative mover"}), "role")
        heads = [h.head for h in circuit.heads if h.role in roles]
        if not heads:
            raise HeadlabError(f"the {circuit.task} circuit in {args.circuit} has no heads with roles {roles}: "
                               f"its roles are {circuit.roles()}")
    model = load_model(args)
    task = make_task(args.task, model.tokenizer, args.n, seed=args.seed)
    result = repair(model, task, heads, wrong_positions=split_list(args.wrong_positions),
                    answer_position=args.answer_position or None, seed=args.seed)
    result.save(args.out)
    print(f"{args.task}: editing {', '.join(result.heads)} (control {', '.join(result.control_heads)}), n = {result.n}")
    for cond, acc in result.accuracy.items():
        print(f"  {cond:8s} " + "  ".join(f"{m} {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
                                          for m, a in acc.items()))
    print(f"wrote {args.out}/")
    return 0
