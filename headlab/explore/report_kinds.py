"""One loader per report kind (`LOADERS[kind](folder) -> Report`): the result class that wrote the folder reads it,
headlab.viz draws it. See explore/reports.py for how a folder's kind is told and what a Report holds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from headlab.explore.reports import Report, ReportError, _in_progress, flatten, md_table
from headlab.results import HeadScores, read_json, read_jsonl

TOP = 5  # heads per map in a report's top-heads table
META_KEYS = ("model_class", "n_layers", "n_heads", "n_kv_heads", "head_dim", "device", "dtype", "headlab", "time",
             "seconds", "source", "weights_note")


def top_rows(scores: HeadScores, maps: list[str] | None = None, *, k: int = TOP,
             smallest: tuple[str, ...] = ()) -> tuple[tuple[str, str, float], ...]:
    """The k best heads of each map (HeadScores.top: largest first; `smallest` maps: lowest first), NaN skipped."""
    rows = []
    for name in maps or [scores.primary]:
        if name not in scores.maps:
            continue
        for head, value in scores.top(k, map=name, largest=name not in smallest):
            if math.isfinite(value):
                rows.append((name, str(head), value))
    return tuple(rows)


def scores_settings(scores: HeadScores, extra: dict[str, Any] | None = None) -> str:
    """params.* then the run facts of meta (model, geometry, versions, time) as one Markdown table."""
    rows = {"model": scores.model, "analysis": scores.analysis}
    rows |= {f"params.{k}": v for k, v in flatten(scores.params).items()}
    rows |= {f"meta.{k}": scores.meta[k] for k in META_KEYS if k in scores.meta}
    return md_table(rows | (extra or {}))


def heatmaps(scores: HeadScores, maps: list[str] | None = None) -> list[tuple[str, Any]]:
    return [(f"heatmap {m}", scores.figure(m)) for m in (maps or list(scores.maps)) if m in scores.maps]


def load_induction(folder: Path) -> Report:
    scores = HeadScores.load(folder)
    notes = ""
    if "loss_first_copy" in scores.meta:
        notes = (f"loss on the first copy {scores.meta['loss_first_copy']:.3f}, on the second copy "
                 f"{scores.meta['loss_second_copy']:.3f}")
    return Report(kind="induction", folder=folder, model=scores.model, title=f"induction scan — {scores.model}",
                  settings_md=scores_settings(scores), top=top_rows(scores, ["induction", "prev_token"]),
                  figures=tuple(heatmaps(scores, ["induction", "prev_token", "first_token"])), notes_md=notes,
                  result=scores)


def load_sinks(folder: Path) -> Report:
    from headlab.viz.sinks import column_figure

    scores = HeadScores.load(folder)
    figures = heatmaps(scores, ["sink_share", "first_score", "later_share"])
    for key in ("later_share", "first_score"):
        if key in scores.maps and "column_score" in scores.items and scores.meta.get("prompt_tokens"):
            head = scores.top(1, map=key)[0][0]
            figures.append((f"column {key} {head}", column_figure(scores, head)))
    return Report(kind="sinks", folder=folder, model=scores.model, title=f"sink scan — {scores.model}",
                  settings_md=scores_settings(scores), top=top_rows(scores, ["sink_share", "later_share"]),
                  figures=tuple(figures), result=scores)


def load_retrieval(folder: Path) -> Report:
    from headlab.analyses.razor import RetrievalReport

    report = RetrievalReport.load(folder)
    scores = report.scores
    rows = "\n".join(f"| {name} | {r['accuracy']:.3f} | {r['found']:.1%} | {r['kv_fraction']:.1%} | {r['n']} |"
                     for name, r in report.summary.items())
    notes = f"| condition | recall | found | KV kept | n |\n|---|---|---|---|---|\n{rows}" if rows else ""
    meta = {k: v for k, v in scores.meta.items() if k != "summary"}
    return Report(kind="retrieval", folder=folder, model=scores.model, title=f"retrieval scan — {scores.model}",
                  settings_md=scores_settings(replace(scores, meta=meta)),
                  top=top_rows(scores) + top_rows(report.razor, ["echo", "induction"]),
                  figures=tuple(report.figures().items()), notes_md=notes, result=report)


def load_calibration(folder: Path) -> Report:
    from headlab.viz.sinks import accuracy_figure

    scores = HeadScores.load(folder)
    state = read_json(folder / "state.json", missing_ok=True) or {}
    figures = heatmaps(scores, ["calib_gain", "sink_strength"])
    if scores.meta.get("tables"):
        figures.insert(0, ("accuracy", accuracy_figure(scores.meta["tables"],
                                                       title=f"ACT calibration — {scores.model}")))
    kept = ", ".join(scores.meta.get("heads", [])) or "none"
    notes = f"heads kept: {kept}; tried {len(state.get('tried', []))} candidates"
    return Report(kind="calibration", folder=folder, model=scores.model, title=f"ACT calibration — {scores.model}",
                  settings_md=scores_settings(scores), top=top_rows(scores, ["calib_gain", "sink_strength"]),
                  figures=tuple(figures), notes_md=notes, result=scores)


def load_prune(folder: Path) -> Report:
    from headlab.prune.experiment import RUN_FILE, PruneResults, slug

    run = read_json(folder / RUN_FILE)
    result = PruneResults.load(folder)
    have = {(r["ranker"], r["fraction"], r["eval"]) for r in result.rows}
    want = {(n, f, e) for r in run.get("runs", []) for n in r.get("rankers", []) for f in r.get("fractions", [])
            for e in r.get("evals", [])}
    if missing := want - have:
        raise _in_progress(folder, f"{len(missing)} of {len(want)} (ranker, fraction, eval) rows are not in "
                                   "results.jsonl yet")
    if missing_rank := [n for n in dict.fromkeys(n for n, _, _ in want) if n not in result.rankings]:
        raise ReportError(f"{folder}: the ranking of {missing_rank[0]} is missing (rankings/{slug(missing_rank[0])}/)")
    model = run.get("identity", {}).get("model", "")
    evals = list(dict.fromkeys(r["eval"] for r in result.rows))
    top = tuple((f"{name}: importance", h, v) for name, ranking in result.rankings.items()
                for _, h, v in top_rows(ranking, k=3))
    rows = {"model": model, **{f"params.{k}": v for k, v in flatten(run.get("params", {})).items()},
            "direction": run.get("direction", ""), "runs": len(run.get("runs", []))}
    notes = ""
    if result.atp_vs_ablation:
        c = result.atp_vs_ablation
        notes = f"AtP vs exhaustive ablation: Spearman {c['spearman']:.3f}, top-{c['k']} overlap {c['top_k_overlap']:.2f}"
    return Report(kind="prune", folder=folder, model=model,
                  title=f"pruning curves — {model} ({', '.join(result.rankings)}; {', '.join(evals)})",
                  settings_md=md_table(rows), top=top, figures=tuple((f"curve {e}", result.figure(e)) for e in evals),
                  notes_md=notes, result=result)


def load_icl(folder: Path) -> Report:
    from headlab.icl.training import ICLRun
    from headlab.viz import icl as figures

    try:
        run = ICLRun.load(folder)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise ReportError(f"{folder}/checkpoint.safetensors cannot be read ({type(err).__name__}: {err})") from None
    if not len(run.history.get("steps", [])):
        raise ReportError(f"{folder}: the run has no checkpoint recorded yet")
    saved = read_json(folder / "run.json")
    figs = [("training curves", figures.training_curves(run)), ("KQ and OV", figures.weights_over_training(run))]
    if run.model_params.kind == "lsa":
        figs.append(("LSA distance", figures.lsa_distance_curve(run)))
    h = run.history
    notes = (f"step {run.step}: eval MSE {float(h['eval_mse'][-1]):.4f} (noisy target), "
             f"{float(h['eval_clean_mse'][-1]):.4f} (clean); {len(h['steps'])} checkpoints")
    if run.step < run.train_params.steps:
        notes += (f". The run stopped at step {run.step} of {run.train_params.steps} (still training, or interrupted: "
                  "rerun the same `icl train` command to continue)")
    rows = {f"{k}": v for k, v in flatten(run.settings()).items()}
    rows |= {f"patterns.{k}": v for k, v in (saved.get("patterns") or {}).items()}
    rows |= {f"meta.{k}": v for k, v in run.meta.items() if not isinstance(v, (list, dict))}
    return Report(kind="icl", folder=folder, model=run.model_params.name,
                  title=f"in-context regression — {run.model_params.name}, {run.step} steps",
                  settings_md=md_table(rows), figures=tuple(figs), notes_md=notes, result=run)


def load_kinds(folder: Path) -> Report:
    from headlab.analyses.kinds import KindComparison

    comp = KindComparison.load(folder)
    top = tuple((f"{key}: induction_share", h, v) for key, sc in comp.scores.items()
                for _, h, v in top_rows(sc, ["induction_share"], k=3))
    rows = {"models": ", ".join(comp.models), **{f"params.{k}": v for k, v in flatten(comp.params).items()},
            **{f"layer kinds.{k}": ", ".join(v) for k, v in comp.layer_kinds.items()}}
    figs = [(f"by model {m}", comp.figure(m)) for m in ("norm_entropy", "monotonicity", "induction_share",
                                                         "pattern_rank_frac")]
    return Report(kind="kinds", folder=folder, model=", ".join(comp.models),
                  title=f"heads across attention kinds — {', '.join(comp.models)}", settings_md=md_table(rows),
                  top=top, figures=tuple(figs), notes_md=comp.to_markdown(["norm_entropy", "monotonicity",
                                                                           "induction_share"]), result=comp)


def load_circuit(folder: Path) -> Report:
    from headlab.circuits.circuit import Circuit

    circuit = Circuit.load(folder)
    heads = sorted(circuit.heads, key=lambda h: -abs(h.effect))
    top = tuple((f"effect ({h.role})", str(h.head), h.effect) for h in heads[:10])
    figs = [("circuit graph", circuit.figure())]
    if HeadScores.saved(folder / "patching"):
        figs.append(("heatmap effect", HeadScores.load(folder / "patching").figure()))
    meta = {k: v for k, v in circuit.meta.items() if not isinstance(v, (list, dict))}
    rows = {"task": circuit.task, "model": circuit.model, "fraction": circuit.fraction,
            **{f"params.{k}": v for k, v in flatten(circuit.params).items()}, **{f"meta.{k}": v for k, v in meta.items()}}
    return Report(kind="circuit", folder=folder, model=circuit.model,
                  title=f"{circuit.task} circuit — {circuit.model} ({len(circuit.heads)} heads, "
                        f"{len(circuit.edges)} edges)", settings_md=md_table(rows), top=top, figures=tuple(figs),
                  result=circuit)


def load_moh_convert(folder: Path) -> Report:
    from headlab.moh.convert import Conversion

    conv = Conversion.load(folder)
    if not conv.rows:
        raise _in_progress(folder, "rows.jsonl has no rows yet")
    figs = [("ppl", conv.figure("ppl"))]
    if any("acc" in r["metrics"] for r in conv.rows):
        figs.append(("acc", conv.figure("acc")))
    rows = {"model": conv.run.get("model", ""), **{f"params.{k}": v for k, v in flatten(conv.run.get("params", {})).items()},
            "ks": conv.run.get("ks", "")}
    return Report(kind="moh_convert", folder=folder, model=str(conv.run.get("model", "")),
                  title=f"MoH conversion — {conv.run.get('model', '?')}", settings_md=md_table(rows),
                  figures=tuple(figs), notes_md=conv.markdown(), result=conv)


def load_moh_routing(folder: Path) -> Report:
    from headlab.moh.routing import MoHRouting
    from headlab.viz.moh import type_lifts

    routing = MoHRouting.load(folder / "routing")
    summary = read_json(folder / "summary.json")
    scores = routing.scores
    figs = [("frequency", routing.figure("frequency"))]
    if summary.get("by_type_full"):
        figs.append(("token types", type_lifts(summary["by_type_full"], title=f"routing by token type — {scores.model}")))
    keys = ("tokens", "shared", "k", "n_routed", "mean_L_b", "balanced_L_b", "mean_cv", "query_heads_on",
            "kv_groups_read")
    notes = md_table({k: summary[k] for k in keys if k in summary}, header=("summary", "value"))
    return Report(kind="moh_routing", folder=folder, model=scores.model, title=f"MoH routing — {scores.model}",
                  settings_md=scores_settings(scores), top=top_rows(scores, ["frequency"]), figures=tuple(figs),
                  notes_md=notes, result=routing)


def load_linearize(folder: Path) -> Report:
    from headlab.viz.linearize import hybrid_curve

    report = HeadScores.load(folder / "transfer")
    summary = read_json(folder / "report.json")
    figs = heatmaps(report, ["rel_error", "kl"])
    for name in sorted(p.name for p in folder.glob("hybrid*.jsonl")):
        if rows := [r for r in read_jsonl(folder / name) if "k" in r and "ppl" in r]:
            figs.append((name.removesuffix(".jsonl"), hybrid_curve(rows, title=f"{name}: perplexity by heads kept "
                                                                             "softmax")))
    notes = ""
    if "mean_rel_error" in summary:
        notes = f"mean relative output error {summary['mean_rel_error']:.3f}, mean KL {summary.get('mean_kl', math.nan):.3f}"
    return Report(kind="linearize", folder=folder, model=report.model, title=f"linearization transfer — {report.model}",
                  settings_md=scores_settings(report), top=top_rows(report, ["rel_error"]), figures=tuple(figs),
                  notes_md=notes, result=report)


def load_twins(folder: Path) -> Report:
    from headlab.explore.reports import twin_folders
    from headlab.viz.kinds import loss_curves

    runs = {p.name: read_json(p / "run.json") for p in twin_folders(folder)}
    rows = []
    for name, run in runs.items():
        row = {"twin": run.get("name", name), "layers": "+".join(run.get("layer_kinds", [])),
               "params": run.get("n_params", ""), "final train loss": run.get("final_train_loss", math.nan),
               "seconds": run.get("train_seconds", "")}
        row |= {k: v for k, v in flatten(run.get("eval", {})).items() if isinstance(v, float)}
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    notes = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                      + ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows])
    recipes = [run.get("params", {}) for run in runs.values()]
    common = {k: v for k, v in recipes[0].items() if all(r.get(k) == v for r in recipes)}
    curves = {name: run["curve"] for name, run in runs.items() if run.get("curve")}
    return Report(kind="twins", folder=folder, model=", ".join(runs),
                  title=f"trained twins — {len(runs)} models ({', '.join(runs)})",
                  settings_md=md_table({f"recipe.{k}": v for k, v in flatten(common).items()}),
                  figures=(("training loss", loss_curves(curves, title=f"training loss — {folder.name}")),),
                  notes_md=notes, result=runs)


def load_scores(folder: Path) -> Report:
    scores = HeadScores.load(folder)
    return Report(kind="scores", folder=folder, model=scores.model, title=f"{scores.analysis} scores — {scores.model}",
                  settings_md=scores_settings(scores), top=top_rows(scores), figures=tuple(heatmaps(scores)[:4]),
                  result=scores)


LOADERS: dict[str, Callable[[Path], Report]] = {
    "induction": load_induction, "sinks": load_sinks, "retrieval": load_retrieval, "calibration": load_calibration,
    "prune": load_prune, "icl": load_icl, "kinds": load_kinds, "circuit": load_circuit,
    "moh_convert": load_moh_convert, "moh_routing": load_moh_routing, "linearize": load_linearize,
    "twins": load_twins, "scores": load_scores,
}
