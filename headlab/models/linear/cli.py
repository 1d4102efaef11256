"""`headlab train twins`: train the softmax / linear-attention twins (resumable: finished twins are kept)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from headlab.models.linear.train import STACKS, TASKS, TWINS_DIR

    train = sub.add_parser("train", help="train headlab's own models")
    train_sub = train.add_subparsers(dest="what", required=True)
    twins = train_sub.add_parser(
        "twins", help="a softmax model and one per linear kind, on the same data with the same recipe",
        description="Train twins into OUT/<task>-<kind>/ (HF folder, run.json, README.md model card). "
                    "Twins that already have a run.json are kept unless --force, so an interrupted run resumes.")
    twins.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks ({', '.join(TASKS)})")
    twins.add_argument("--kinds", default=",".join(STACKS), help=f"comma-separated kinds ({', '.join(STACKS)})")
    twins.add_argument("--out", type=Path, default=TWINS_DIR, help=f"output folder (default {TWINS_DIR})")
    twins.add_argument("--steps", type=int, default=None, help="training steps (default: the task's recipe)")
    twins.add_argument("--seed", type=int, default=0)
    twins.add_argument("--force", action="store_true", help="retrain twins that are already there")
    twins.add_argument("--no-progress", action="store_true")
    twins.set_defaults(handler=cmd_train_twins)


def _split(value: str, allowed, what: str) -> list[str]:
    from headlab.errors import HeadlabError

    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise HeadlabError(f"unknown {what} {bad or value!r}: choose from {', '.join(allowed)}")
    return items


def cmd_train_twins(args) -> int:
    from headlab.models.linear.train import STACKS, TASKS, summary_table, train_twins

    tasks = _split(args.tasks, TASKS, "task")
    kinds = _split(args.kinds, STACKS, "kind")
    overrides = {"seed": args.seed} | ({"steps": args.steps} if args.steps is not None else {})
    train_twins(tasks, kinds, out=args.out, force=args.force, progress=not args.no_progress, **overrides)
    for row in summary_table(args.out):
        print(json.dumps(row))
    print(f"wrote {args.out}/")
    return 0
