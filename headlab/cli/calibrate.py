"""`headlab calibrate`: ACT head search on a calibration split, held-out accuracy before/after (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlab.cli.common import (add_executor_args, add_model_args, add_rule_args, choose, count, executor_from_args, finite,
                                layer_range, load_model, natural, rule_from_args, write_figure)


def register(sub) -> None:
    from headlab.analyses.calibration import CalibrationParams

    d = CalibrationParams()
    p = sub.add_parser("calibrate", help="ACT attention calibration: search heads on a calibration split, "
                                         "evaluate before/after (resumable)")
    add_model_args(p)
    p.add_argument("--out", required=True, type=Path, help="run folder (state.json, scores, figures); rerun to resume")
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated task names")
    p.add_argument("--n-calib", type=count, default=d.n_calib, help="calibration items per task")
    p.add_argument("--n-eval", type=count, default=d.n_eval, help="evaluation items per task")
    p.add_argument("--seed", type=natural, default=d.seed)
    p.add_argument("--beta", type=finite, default=d.beta)
    add_rule_args(p, min_visible=d.rule.min_visible)
    p.add_argument("--no-first-exempt", action="store_true", help="calibrate the first sink too")
    p.add_argument("--layers", type=layer_range, default=None, help="inclusive layer range LO:HI (default 2:L-2)")
    p.add_argument("--candidates", type=count, default=d.candidates, help="heads to try, by sink strength")
    p.add_argument("--search", choices=("greedy", "independent"), default=d.search)
    add_executor_args(p, units="an independent search's candidate heads",
                      note="; a greedy search is sequential and runs here")
    p.add_argument("--no-control", action="store_true", help="skip evaluating all candidates at once")
    p.add_argument("--no-bos", action="store_true")
    p.add_argument("--batch", type=count, default=d.batch)
    p.add_argument("--threads", type=count, default=1, help="torch CPU threads")
    p.set_defaults(handler=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run (or resume) a calibration search, write its figures and print the accuracy tables."""
    import torch

    from headlab.analyses.calibration import CalibrationParams, accuracy_figure, calibration_search, table_lines

    torch.set_num_threads(args.threads)
    layers = args.layers
    from headlab.tasks.choice import TASKS

    params = CalibrationParams(tasks=tuple(choose(args.tasks, TASKS, "task")), n_calib=args.n_calib, n_eval=args.n_eval,
                               seed=args.seed, beta=args.beta, rule=rule_from_args(args),
                               first_exempt=not args.no_first_exempt, layers=layers, candidates=args.candidates,
                               search=args.search, control=not args.no_control, prepend_bos=not args.no_bos,
                               batch=args.batch)
    executor = executor_from_args(args)  # checked before the model loads
    model = load_model(args, show=False)
    print(model, f"\n{model.note}" if model.note else "")
    scores = calibration_search(model, params, out=args.out, executor=executor)
    scores.save(args.out)
    write_figure(scores.figure("calib_gain"), args.out / "heatmap_calib_gain.html")
    write_figure(scores.figure("sink_strength"), args.out / "heatmap_sink_strength.html")
    write_figure(accuracy_figure(scores.meta["tables"], title=f"ACT calibration (β = {params.beta}) — {model.name}"),
                 args.out / "accuracy.html")
    print(f"calibration split: baseline {scores.meta['calib_baseline']:.3f} on {scores.meta['n_calib_items']} items; "
          f"tried {', '.join(scores.meta['candidates'])}")
    print("\n".join(table_lines(scores)))
    print(f"wrote {args.out}/ ({scores.meta['seconds']} s this run; steps {scores.meta['step_seconds']})")
    return 0
