"""The explorer's Pruning tab, free of Gradio: a saved `headlab prune` run, its curves, and its masks on the live model.

The mask of (ranker, fraction) is the prune experiment's own (`PruneResults.mask` → `prune.experiment.removed_heads`
of the run's saved ranking; zero ablation by `prune_edits`): the heads it removed at that fraction, and the same rule
at any fraction in between. `apply` opens it with `hl.edit` on the prompt analysed in the Heads tab (inside the call,
so the shared model is untouched) and compares the predictions and loss with the original; `remeasure` runs one of the
run's own evals under the mask, to set beside the row it recorded.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import headlab as hl
from headlab.errors import EditError
from headlab.explore.core import Explorer, Session, _require, comparison_md, predict
from headlab.explore.reports import Report, ReportError, ReportLibrary


def prune_report(library: ReportLibrary, folder: str) -> Report:
    """The prune report in `folder` (a ReportError when it is another kind)."""
    report = library.open(folder)
    if report.kind != "prune":
        raise ReportError(f"{report.folder} is a {report.kind} report, not a pruning run (written by `headlab prune`)")
    return report


def prune_view(library: ReportLibrary, folder: str) -> tuple[str, Any, list[str], list[float], str]:
    """(status, the curves of the run's first eval, its rankers, its fractions, Markdown of the run's table)."""
    report = prune_report(library, folder)
    result = report.result
    fractions = sorted({float(r["fraction"]) for r in result.rows})
    lines = []
    for spec in dict.fromkeys(r["eval"] for r in result.rows):
        table = result.table(spec)
        primary = next(r["primary"] for r in result.rows if r["eval"] == spec)
        lines.append(f"**{spec}** ({primary} by fraction of heads removed)\n\n| ranker | "
                     + " | ".join(f"{f:g}" for f in fractions) + " |\n|---|" + "---|" * len(fractions) + "\n"
                     + "\n".join(f"| {name} | " + " | ".join(f"{table.get(name, {}).get(f, math.nan):.4g}"
                                                             for f in fractions) + " |" for name in result.rankings))
    status = f"Opened the pruning run {report.folder.name} ({report.model}): rankers {', '.join(result.rankings)}."
    return status, report.figure(), list(result.rankings), fractions, "\n\n".join(lines)


def recorded_rows(report: Report, ranker: str, fraction: float) -> list[dict[str, Any]]:
    """The rows the run recorded for (ranker, fraction), one per eval (none at a fraction it did not measure)."""
    return [r for r in report.result.rows if r["ranker"] == ranker and math.isclose(r["fraction"], fraction)]


def _mask(ex: Explorer, report: Report, model, ranker: str, fraction: float | None) -> tuple[list, float]:
    if fraction is None or not math.isfinite(float(fraction)) or not 0.0 <= float(fraction) <= 1.0:
        raise EditError(f"fraction {fraction!r} must lie in [0, 1]: the share of heads removed")
    ranking = report.result.rankings.get(ranker)
    if ranking is None:
        raise EditError(f"choose a ranker of the run: {', '.join(report.result.rankings)}")
    shape = tuple(ranking.scores.shape)
    if shape != (model.n_layers, model.n_heads):
        raise EditError(f"the pruning run ranked {shape[0]} × {shape[1]} heads ({report.model}); {model.name} has "
                        f"{model.n_layers} × {model.n_heads}: analyse a prompt with the run's model in the Heads tab")
    return report.result.mask(ranker, float(fraction)), float(fraction)


def _other_model(report: Report, model) -> str:
    """A warning when the live model is not the one the run ranked and measured (same shape, other weights)."""
    if report.model and report.model != model.name:
        return f" ⚠ The run ranked {report.model}'s heads; this prompt runs on {model.name}."
    return ""


def apply(ex: Explorer, library: ReportLibrary, session: Session | None, folder: str, ranker: str,
          fraction: float | None) -> tuple[str, str, float]:
    """The run's mask for (ranker, fraction) on the analysed prompt: (status, Markdown comparing predictions and loss
    original vs masked, plus the run's recorded rows at that fraction, the masked loss)."""
    _require(session)
    report = prune_report(library, folder)
    model = ex.cache.get(session.model)
    if not model.is_lm:
        raise EditError(f"{model.name} has no LM head: the mask is measured through predictions and loss")
    heads, fraction = _mask(ex, report, model, ranker, fraction)
    from headlab.prune.experiment import prune_edits

    loss, top = predict(model, model.encode(list(session.ids)), ex.settings.top_k, prune_edits(heads))
    n_total = model.n_layers * model.n_heads
    label = f"{ranker} mask at fraction {fraction:g}: {len(heads)} of {n_total} heads zero-ablated"
    body = comparison_md(session.top, top, session.loss, loss, label)
    shown = ", ".join(map(str, heads[:24])) + (f", … ({len(heads) - 24} more)" if len(heads) > 24 else "")
    body += f"\n\nheads removed (least important first): {shown or 'none'}"
    rows = recorded_rows(report, ranker, fraction)
    if rows:
        same = all(r["removed"] == [str(h) for h in heads] for r in rows)
        body += "\n\nthe run recorded at this fraction: " + "; ".join(
            f"{r['eval']}: {r['primary']} **{r['value']:.4f}**" for r in rows) + (
            "" if same else " (⚠ its rows removed other heads than the saved ranking gives now)")
    status = f"Applied the {ranker} mask at {fraction:g} ({len(heads)} heads) to {session.n_tokens} tokens " \
             f"(the shared model is untouched).{_other_model(report, model)}"
    return status, body, loss


def remeasure(ex: Explorer, library: ReportLibrary, session: Session | None, folder: str, ranker: str,
              fraction: float | None, spec: str | None = None) -> tuple[str, str, dict[str, float]]:
    """One of the run's evals (its first by default) under the mask, on the analysed prompt's model: (status,
    Markdown beside the recorded row where the run measured this fraction, the metrics)."""
    from headlab.prune.evals import parse_eval
    from headlab.prune.experiment import RUN_FILE, prune_edits
    from headlab.results import read_json

    _require(session)
    report = prune_report(library, folder)
    model = ex.cache.get(session.model)
    heads, fraction = _mask(ex, report, model, ranker, fraction)
    specs = list(dict.fromkeys(r["eval"] for r in report.result.rows))
    spec = spec or specs[0]
    if spec not in specs:
        raise EditError(f"the run has no eval {spec!r}: its evals are {', '.join(specs)}")
    p = read_json(report.folder / RUN_FILE).get("params", {})
    ev = parse_eval(spec, ctx=p.get("ctx", 128), windows=p.get("windows", 8), seed=p.get("task_seed", 1),
                    seq_len=p.get("task_seq_len", 32))
    with hl.edit(model, prune_edits(heads)), torch.no_grad():
        metrics = ev.metrics(model)
    text = f"{spec} with the {ranker} mask at {fraction:g} on {model.name}: " + ", ".join(
        f"{k} **{v:.4f}**" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    rows = [r for r in recorded_rows(report, ranker, fraction) if r["eval"] == spec]
    if rows:
        text += f"\n\nthe run recorded: {rows[0]['primary']} **{rows[0]['value']:.4f}**"
    return f"Re-measured {spec} under the mask.{_other_model(report, model)}", text, metrics
