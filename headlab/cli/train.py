"""`headlab train twins | toy`: train headlab's own models (twins resumable: finished twins are kept)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.cli.common import choose, count, natural


def register(sub: argparse._SubParsersAction) -> None:
    from headlab.models.linear.config import STACKS
    from headlab.models.linear.train import TASKS
    from headlab.paths import TWINS_DIR

    train = sub.add_parser("train", help="train headlab's own models")
    train_sub = train.add_subparsers(dest="what", required=True)
    twins = train_sub.add_parser(
        "twins", help="a softmax model and one per linear kind, on the same data with the same recipe",
        description="Train twins into OUT/<task>-<kind>/ (HF folder, run.json, README.md model card). "
                    "Twins that already have a run.json are kept unless --force, so an interrupted run resumes.")
    twins.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks ({', '.join(TASKS)})")
    twins.add_argument("--kinds", default=",".join(STACKS), help=f"comma-separated kinds ({', '.join(STACKS)})")
    twins.add_argument("--out", type=Path, default=TWINS_DIR, help=f"output folder (default {TWINS_DIR})")
    twins.add_argument("--steps", type=count, default=None, help="training steps (default: the task's recipe)")
    twins.add_argument("--seed", type=natural, default=0)
    twins.add_argument("--force", action="store_true", help="retrain twins that are already there")
    twins.add_argument("--no-progress", action="store_true")
    twins.set_defaults(handler=cmd_train_twins)

    from headlab.paths import TOY_INDUCTION_DIR

    toy = train_sub.add_parser("toy", help="the bundled toy-induction model (three phases, ~2 minutes on 2 cores)")
    toy.add_argument("--out", type=Path, default=TOY_INDUCTION_DIR, help=f"output folder (default {TOY_INDUCTION_DIR})")
    toy.add_argument("--seed", type=natural, default=0, help="seed for init and data (default 0)")
    toy.add_argument("--no-progress", action="store_true")
    toy.set_defaults(handler=cmd_train_toy)


def cmd_train_toy(args) -> int:
    from headlab.models.toy import train_toy_induction

    m = train_toy_induction(args.out, seed=args.seed, progress=not args.no_progress)
    print(f"{'N':>4} {'top L1 induction':>17} {'prev-token ' + m['eval_by_length']['prev_token_head']:>15} "
          f"{'2nd-copy loss':>14} {'prev ablated':>13}")
    for n, e in m["eval_by_length"]["lengths"].items():
        print(f"{n:>4} {e['top_induction']:>17.3f} {e['prev_token']:>15.3f} {e['second_copy_loss']:>14.3f} "
              f"{e['second_copy_loss_prev_ablated']:>13.3f}")
    print(f"trained in {m['train_seconds']:.0f} s; wrote {args.out}/ (model card: model_card.md)")
    return 0


def cmd_train_twins(args) -> int:
    from headlab.models.linear.config import STACKS
    from headlab.models.linear.train import TASKS, summary_table, train_twins

    tasks = choose(args.tasks, TASKS, "task")
    kinds = choose(args.kinds, STACKS, "kind")
    overrides = {"seed": args.seed} | ({"steps": args.steps} if args.steps is not None else {})
    train_twins(tasks, kinds, out=args.out, force=args.force, progress=not args.no_progress, **overrides)
    for row in summary_table(args.out):
        print(json.dumps(row))
    print(f"wrote {args.out}/")
    return 0
