"""The explorer's ICL tab, free of Gradio: a saved `headlab icl train` run, its KQ and OV at a chosen checkpoint and
its loss curves (headlab.viz.icl draws both from the run's recorded history)."""

from __future__ import annotations

import math
from functools import reduce
from typing import Any

from headlab.explore.reports import Report, ReportError, ReportLibrary


def icl_report(library: ReportLibrary, folder: str) -> Report:
    """The `icl train` report in `folder` (a ReportError when it is another kind)."""
    report = library.open(folder)
    if report.kind != "icl":
        raise ReportError(f"{report.folder} is a {report.kind} report, not an `icl train` run")
    return report


def steps(report: Report) -> list[int]:
    """The training steps at which the run recorded a checkpoint."""
    return [int(s) for s in report.result.history["steps"].tolist()]


def slider_range(report: Report) -> tuple[int, int, int]:
    """(first step, last step, spacing) of the checkpoints: the step slider's range."""
    saved = steps(report)
    gaps = [b - a for a, b in zip(saved, saved[1:])]
    return saved[0], saved[-1], max(1, reduce(math.gcd, gaps, 0))


def icl_open(library: ReportLibrary, folder: str) -> tuple[str, Any, Any, tuple[int, int, int], int]:
    """(status, KQ and OV at the last checkpoint, the loss curves, the step slider's (first, last, spacing), the step
    shown)."""
    from headlab.viz.icl import training_curves

    report = icl_report(library, folder)
    status, fig, step = icl_view(library, folder, None)
    return status, fig, training_curves(report.result), slider_range(report), step


def icl_view(library: ReportLibrary, folder: str, step: float | None = None) -> tuple[str, Any, int]:
    """(status, KQ and OV heatmaps at the saved checkpoint nearest `step` (the last when None), the step shown)."""
    from headlab.viz.icl import weights_at

    report = icl_report(library, folder)
    run = report.result
    saved = steps(report)
    if step is None or not math.isfinite(float(step)):
        index = len(saved) - 1
    else:
        index = min(range(len(saved)), key=lambda i: (abs(saved[i] - float(step)), i))
    kq, ov = run.history["kq"], run.history["ov"]
    fig = weights_at(kq[index], ov[index], step=saved[index], kq_max=float(kq.abs().max()),
                     ov_max=float(ov.abs().max()),
                     title=f"{run.model_params.name}: KQ and OV at step {saved[index]} (checkpoint {index + 1} of "
                           f"{len(saved)})")
    h = run.history
    mse = float(h["eval_mse"][index])
    status = (f"Step {saved[index]}: eval MSE {mse:.4f} (noisy target), {float(h['eval_clean_mse'][index]):.4f} "
              f"(clean).")
    return status, fig, saved[index]
