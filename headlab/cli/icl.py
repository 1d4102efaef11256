"""`headlab icl train --out DIR ...` (train one model on in-context regression, resumably) and `headlab icl report`.

Rerunning the same `train` command continues from the last checkpoint in DIR (and does nothing once
the run is complete); other settings on an existing DIR are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.cli.common import count, natural, nonnegative, positive, write_figure

KINDS = ("softmax", "linear", "linear_mean", "lsa")


def register(subparsers) -> None:
    """Add the `icl` command with its `train` subcommand to the `headlab` parser's subparsers."""
    icl = subparsers.add_parser("icl", help="in-context linear regression: train one-layer attention, check theory")
    icl_sub = icl.add_subparsers(dest="icl_command", required=True)
    p = icl_sub.add_parser("train", help="train one model, recording KQ/OV and losses at checkpoints (resumable)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, run.json, figures)")
    p.add_argument("--model", choices=KINDS, default="softmax",
                   help="softmax / linear / linear_mean heads (He et al.) or lsa (Zhang–Frei–Bartlett)")
    p.add_argument("--heads", type=count, default=2, help="H, the number of heads (lsa has one)")
    p.add_argument("--preset", choices=("auto", "he", "zfb"), default="auto",
                   help="task: he (σ²=0.1, β~N(0,I/d)) or zfb (noiseless, w~N(0,I)); auto: zfb for lsa, else he")
    p.add_argument("--d", type=count, default=5, help="covariate dimension d")
    p.add_argument("--n", type=count, default=40, help="prompt length N")
    p.add_argument("--noise-var", type=nonnegative, default=None, help="σ² (he preset only; default 0.1)")
    p.add_argument("--steps", type=count, default=None)
    p.add_argument("--batch", type=count, default=None)
    p.add_argument("--lr", type=positive, default=None)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None)
    p.add_argument("--checkpoint-every", type=count, default=None)
    p.add_argument("--sigma", type=positive, default=0.5, help="LSA init scale σ")
    p.add_argument("--seed", type=natural, default=0, help="seed of the data stream, eval set and probes")
    p.add_argument("--model-seed", type=natural, default=0, help="seed of the initial weights")
    p.add_argument("--threads", type=count, default=1, help="torch CPU threads (these models are tiny: 1 is fastest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", action="store_true", help="skip the HTML figures")
    p.set_defaults(handler=cmd_icl_train)

    r = icl_sub.add_parser("report", help="every in-context regression check at the papers' default sizes "
                                          "(trained runs are checkpointed under OUT/runs/ and reused)")
    r.add_argument("--out", type=Path, default=Path("runs/icl-report"))
    r.add_argument("--quick", action="store_true", help="fewer steps and prompts (a smoke run)")
    r.add_argument("--threads", type=count, default=1)
    r.set_defaults(handler=cmd_icl_report)


def cmd_icl_report(args: argparse.Namespace) -> int:
    from headlab.icl.report import run_report

    run_report(args.out, quick=args.quick, threads=args.threads)
    return 0


def params_from_args(args: argparse.Namespace):
    """The (TaskParams, ModelParams, TrainParams) an `icl train` command line asks for."""
    from headlab.icl.models import ModelParams
    from headlab.icl.tasks import TaskParams
    from headlab.icl.training import TrainParams

    preset = args.preset if args.preset != "auto" else ("zfb" if args.model == "lsa" else "he")
    if preset == "zfb":
        task = TaskParams.zfb(d=args.d, n=args.n)
    else:
        task = TaskParams.he(d=args.d, n=args.n, noise_var=0.1 if args.noise_var is None else args.noise_var)
    model = ModelParams(kind=args.model, heads=1 if args.model == "lsa" else args.heads, sigma=args.sigma,
                        seed=args.model_seed)
    names = ("steps", "batch", "lr", "optimizer", "schedule", "checkpoint_every", "seed")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return task, model, TrainParams.for_kind(args.model, **changes)


def cmd_icl_train(args: argparse.Namespace) -> int:
    """Train (or continue) the run in `args.out`, write its figures and print what it found."""
    import torch

    from headlab.viz import icl as figures
    from headlab.icl.theory import lsa_check, pattern_summary
    from headlab.icl.training import train

    torch.set_num_threads(args.threads)
    task, model, tp = params_from_args(args)
    print(f"icl train: {model.name} on d={task.d}, N={task.n}, σ²={task.noise_var}, τ²={task.task_var:.3g}; "
          f"{tp.optimizer} lr={tp.lr} batch={tp.batch}, {tp.steps} steps → {args.out}")
    try:
        run = train(task, model, tp, out=args.out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to continue from the last checkpoint in {args.out}")
        return 130
    resumed = run.meta.get("resumed_at", [])
    if resumed:
        print(f"resumed from step {resumed[-1]}")
    print(f"step {run.step}: eval MSE {float(run.history['eval_mse'][-1]):.4f} (noisy target), "
          f"{float(run.history['eval_clean_mse'][-1]):.4f} (clean); {run.meta['seconds']:.1f} s of training")
    if model.kind == "lsa":
        found = lsa_check(run.model, task, run.probes)
        print(f"‖W^PV_22·W^KQ_11 − Γ⁻¹‖/‖Γ⁻¹‖ = {found['dist']:.4%} (to the (1+1/N)-less Γ₀⁻¹: "
              f"{found['dist_variant']:.4%}; the two differ by {found['gap']:.4%})")
    else:
        found = pattern_summary(run.history["kq"][-1], run.history["ov"][-1])
        print("patterns: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in found.items()}))
    if not args.no_figures:
        write_figure(figures.training_curves(run), args.out / "training.html")
        write_figure(figures.weights_over_training(run), args.out / "weights.html")
        if model.kind == "lsa":
            write_figure(figures.lsa_distance_curve(run), args.out / "lsa_distance.html")
        print(f"wrote {args.out}/ (checkpoint.safetensors, run.json, figures)")
    return 0
