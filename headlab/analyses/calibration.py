"""ACT head search and evaluation: heads to calibrate are chosen on a calibration split and judged on a held-out one.

Following Yu et al. 2024 (GATECH-EIC/ACT), heads are tried one at a time on the calibration split and kept when they
improve its accuracy. Their code tries each head of layers 2..L−2 alone against the plain model ("independent"); the
default here is "greedy": candidates in order, each tried on top of the heads kept so far, kept if it beats the
current accuracy. To be affordable on a CPU only `candidates` heads are tried: those of the layer range with the most
attention on their calibration sink set (the mass that calibration moves, from `HeadModel.stats` on the calibration
prompts; a head whose sink set is empty would be a no-op), strongest first. The chosen set is then evaluated on the
evaluation split (disjoint words, see `headlab.tasks`), with Wilson intervals and a paired bootstrap of the change.
A run folder makes it resumable: `state.json` is rewritten after every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from headlab.sink_rule import SinkRule, exempt_first, sink_mask
from headlab.edits.calibrate import Calibrate
from headlab.edits.heads import edit
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel
from headlab.models.loading import worker_source
from headlab.results import HeadScores, params_dict, read_json, run_meta, write_json
from headlab.run import Batch
from headlab.viz.sinks import accuracy_figure  # noqa: F401  (re-exported: the figure lives in viz)
from headlab.tasks import EncodedItems, build_tasks, correct, encode_items, option_logprobs, paired_bootstrap, wilson

STATE_FILE = "state.json"


@dataclass(frozen=True, kw_only=True)
class CalibrationParams:
    """Settings of the ACT head search and evaluation.

    Attributes:
        tasks: task names (see `headlab.tasks.TASKS`).
        n_calib: items per task in the calibration split (capped by the word pools).
        n_eval: items per task in the evaluation split (capped likewise).
        seed: seed of the task builders and of the bootstrap.
        beta: the share of their weight that sinks keep (ACT: 0.4).
        rule: how sinks are found per input (prompts here are ~40–80 tokens: tail rule at 16 queries).
        first_exempt: leave each head's first sink alone, as ACT's code does.
        layers: the inclusive layer range searched; None: 2..L−2 (ACT's code: 2..30 of Llama-2-7B's 32).
        candidates: how many heads of that range to try, by sink strength.
        search: "greedy" (cumulative) or "independent" (each head alone, ACT's code).
        control: also evaluate all candidates calibrated at once (no search).
        prepend_bos: put BOS before each prompt (SmolLM2's tokenizer adds none).
        batch: prompts per forward.
        bootstrap: resamples of the paired bootstrap.
    """

    tasks: tuple[str, ...] = ("categories", "sentiment", "antonyms")
    n_calib: int = 32
    n_eval: int = 150
    seed: int = 0
    beta: float = 0.4
    rule: SinkRule = field(default_factory=lambda: SinkRule(min_visible=16))
    first_exempt: bool = True
    layers: tuple[int, int] | None = None
    candidates: int = 12
    search: Literal["greedy", "independent"] = "greedy"
    control: bool = True
    prepend_bos: bool = True
    batch: int = 16
    bootstrap: int = 2000

    def layer_range(self, n_layers: int) -> range:
        """The layers searched in a model of `n_layers` layers.

        Args:
            n_layers: L.

        Returns:
            `layers` (inclusive), or 2..L−2, clipped to 0..L−2.
        """
        lo, hi = self.layers if self.layers is not None else (2, n_layers - 2)
        return range(max(0, lo), min(n_layers - 1, hi) + 1)


def sink_strength(model: HeadModel, items: EncodedItems, rule: SinkRule, *, first_exempt: bool = True,
                  batch: int = 16) -> torch.Tensor:
    """`[L, H]`: mean share of each head's attention on its calibration sink set over the items' prompts.

    Args:
        model: the HeadModel.
        items: the encoded calibration items.
        rule: how sinks are found per input.
        first_exempt: leave each head's first sink out of the set.
        batch: prompts per forward.

    Returns:
        float32 `[L, H]`.
    """
    total = torch.zeros(model.n_layers, model.n_heads)
    for i0 in range(0, len(items), batch):
        rows = items.ids[i0:i0 + batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), model.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), 1
        run = model.stats(Batch(ids, mask), statistics={"received"})  # only received mass is read
        for layer, st in run.layers.items():
            sinks = sink_mask(st.received, st.n_visible, rule)  # [b, H, S]
            sinks = exempt_first(sinks) if first_exempt else sinks
            n_q = st.n_visible.amax(-1)[:, None]  # [b, 1]
            total[layer] += ((st.received * sinks).sum(-1) / n_q).sum(0).cpu()
    return total / len(items)


def _accuracy_items(model: HeadModel, items: EncodedItems, heads: list[HeadRef], params: CalibrationParams,
                    desc: str, progress: bool = True) -> torch.Tensor:
    """Bool `[N]`: which items the model gets right with `heads` calibrated (none: the plain model)."""
    edits = [Calibrate(heads=tuple(heads), beta=params.beta, rule=params.rule, first_exempt=params.first_exempt)] \
        if heads else []
    with edit(model, edits):
        return correct(option_logprobs(model, items, batch=params.batch, progress=progress, desc=desc), items.answer)


def _load_state(out: Path | None, params: CalibrationParams, model: HeadModel) -> dict:
    state = read_json(out / STATE_FILE, missing_ok=True) if out is not None else None
    if state is None:
        return {"params": params_dict(params), "model": model.name, "tried": [], "seconds": {}}
    if state["params"] != params_dict(params) or state["model"] != model.name:
        raise ValueError(f"{out} holds a calibration run with other settings or model ({state['model']}): "
                         "use another --out, or the same settings to resume")
    return state


def _save_state(out: Path | None, state: dict) -> None:
    if out is None:
        return
    write_json(out / STATE_FILE, state, indent=0)


@dataclass
class CandidateWorker:
    """Accuracy of one candidate head set on the calibration items: `heads` ("L3H1", …) → mean accuracy.

    Attributes:
        model: the HeadModel (in the worker's process).
        items: the calibration split's encoded items.
        params: the search's settings (beta, sink rule, batch).
    """

    model: HeadModel
    items: EncodedItems
    params: "CalibrationParams"

    def __call__(self, heads: tuple[str, ...]) -> float:
        """The calibration split's mean accuracy with `heads` calibrated."""
        refs = [HeadRef.parse(h) for h in heads]
        return float(_accuracy_items(self.model, self.items, refs, self.params, f"try {heads[-1]}", False)
                     .float().mean())


@dataclass(frozen=True)
class CandidateWorkerSpec:
    """A picklable recipe for a CandidateWorker in another process (a Ray actor): load `source` there.

    Attributes:
        source: the model's bundled name or folder.
        items: the calibration split's encoded items.
        params: the search's settings.
    """

    source: str
    items: EncodedItems
    params: "CalibrationParams"

    def __call__(self) -> CandidateWorker:
        """Load the model and return the worker."""
        from headlab.models import load

        return CandidateWorker(load(self.source), self.items, self.params)


def calibration_search(model: HeadModel, params: CalibrationParams = CalibrationParams(), *, out: Path | None = None,
                       items: tuple[EncodedItems, EncodedItems] | None = None, progress: bool = True,
                       executor: Any = None) -> HeadScores:
    """Search heads on the calibration split, evaluate on the evaluation split; resumable when `out` is given.

    Args:
        model: the HeadModel.
        params: the tasks, sink rule, search and evaluation settings.
        out: a folder for the search state (resumed).
        items: (calibration, evaluation) items to use instead of building `params.tasks` (e.g. token-id items).
        progress: show progress bars.
        executor: where the candidates of an "independent" search are tried (`headlab.executors`; None: here). A
            Ray executor's workers load the model from its name or folder; the search state is written here as each
            candidate finishes. A greedy search is sequential (each step depends on the last) and runs here.

    Raises:
        UnsupportedModelError: a non-local executor for a model that was not loaded from a name or a folder.
        ValueError: `out` holds a search with other settings or another model.

    Returns:
        HeadScores "act_calibration": maps calib_gain (calibration accuracy change when the head was tried; NaN
        if not tried), kept (1 for chosen heads), sink_strength; meta["table"] the accuracies before/after.
    """
    start = time.perf_counter()
    if items is None:
        splits = build_tasks(params.tasks, n_calib=params.n_calib, n_eval=params.n_eval, seed=params.seed)
        calib = encode_items(model, [it for s in splits for it in s.calibration], prepend_bos=params.prepend_bos)
        evals = encode_items(model, [it for s in splits for it in s.evaluation], prepend_bos=params.prepend_bos)
    else:
        calib, evals = items
    state = _load_state(out, params, model)
    secs = state["seconds"]

    def step(key: str, fn):
        if key not in state:
            t0 = time.perf_counter()
            state[key] = fn()
            secs[key] = round(secs.get(key, 0.0) + time.perf_counter() - t0, 1)
            _save_state(out, state)
        return state[key]

    strength = torch.tensor(step("strength", lambda: sink_strength(
        model, calib, params.rule, first_exempt=params.first_exempt, batch=params.batch).tolist()))
    pool = [HeadRef(l, h) for l in params.layer_range(model.n_layers) for h in range(model.n_heads)]
    pool = sorted(pool, key=lambda r: -float(strength[r.layer, r.head]))[: params.candidates]
    candidates = [HeadRef.parse(s) for s in step("candidates", lambda: [str(r) for r in pool])]
    base = torch.tensor(step("baseline_calib", lambda: _accuracy_items(
        model, calib, [], params, "baseline", progress).tolist()))

    tried = {t["head"]: t for t in state["tried"]}
    kept = [HeadRef.parse(t["head"]) for t in state["tried"] if t["kept"]]
    reference = float(base.float().mean())
    if params.search == "greedy" and kept:
        reference = max(t["acc"] for t in state["tried"] if t["kept"])
    remote = executor is not None and executor.name != "local" and params.search == "independent"
    if remote:
        source = worker_source(model, executor.name)
        bar = tqdm(total=sum(str(r) not in tried for r in candidates), desc="head search", leave=False,
                   disable=not progress)

        def record(heads: tuple[str, ...], acc: float) -> None:
            entry = {"head": heads[-1], "acc": acc, "reference": reference, "kept": acc > reference}
            state["tried"].append(entry)
            _save_state(out, state)
            bar.update(1)

        t0 = time.perf_counter()
        executor.run(CandidateWorkerSpec(source, calib, params),
                     [(str(r),) for r in candidates if str(r) not in tried], record)
        bar.close()
        secs["search"] = round(secs.get("search", 0.0) + time.perf_counter() - t0, 1)
        order = {str(r): i for i, r in enumerate(candidates)}  # the state lists candidates in search order
        state["tried"].sort(key=lambda t: order.get(t["head"], len(order)))
        _save_state(out, state)
        tried = {t["head"]: t for t in state["tried"]}
        kept = [HeadRef.parse(t["head"]) for t in state["tried"] if t["kept"]]
    for ref in tqdm(candidates, desc="head search", leave=False, disable=not progress):
        if str(ref) in tried:
            continue
        t0 = time.perf_counter()
        trial = kept + [ref] if params.search == "greedy" else [ref]
        acc = float(_accuracy_items(model, calib, trial, params, f"try {ref}", progress).float().mean())
        entry = {"head": str(ref), "acc": acc, "reference": reference, "kept": acc > reference}
        if entry["kept"]:
            kept.append(ref)
            reference = acc if params.search == "greedy" else reference
        state["tried"].append(entry)
        secs["search"] = round(secs.get("search", 0.0) + time.perf_counter() - t0, 1)
        _save_state(out, state)

    conditions = {"baseline": [], "calibrated": kept}
    if params.control:
        conditions["all_candidates"] = candidates
    results: dict[str, torch.Tensor] = {}
    for name, heads in conditions.items():
        if name != "baseline" and not heads:  # nothing to calibrate: the plain model's answers
            results[name] = results["baseline"]
            continue
        results[name] = torch.tensor(step(f"eval_{name}", lambda h=heads, n=name: _accuracy_items(
            model, evals, h, params, f"eval {n}", progress).tolist()))
    return _scores(model, params, state, strength, candidates, kept, evals, results,
                   round(time.perf_counter() - start, 1))


def accuracy_table(before: torch.Tensor, after: torch.Tensor, tasks: list[str], *, reps: int = 2000,
                   seed: int = 0) -> list[dict]:
    """Per task and pooled: accuracy before/after with Wilson 95% intervals and the change with a paired bootstrap.

    Args:
        before: bool `[N]`, items right before calibration.
        after: bool `[N]`, items right after.
        tasks: each item's task name.
        reps: bootstrap resamples.
        seed: the bootstrap's seed.

    Returns:
        One row per task and one "all": task, n, before, before_ci, after, after_ci, delta, delta_ci (paired
        bootstrap 95%), lost (right → wrong), gained (wrong → right).
    """
    rows = []
    for name in list(dict.fromkeys(tasks)) + ["all"]:
        idx = torch.tensor([i for i, t in enumerate(tasks) if name in ("all", t)])
        b, a = before[idx], after[idx]
        n = len(idx)
        rows.append({"task": name, "n": n,
                     "before": float(b.float().mean()), "before_ci": list(wilson(int(b.sum()), n)),
                     "after": float(a.float().mean()), "after_ci": list(wilson(int(a.sum()), n)),
                     "delta": float(a.float().mean() - b.float().mean()),
                     "delta_ci": list(paired_bootstrap(b, a, reps=reps, seed=seed)),
                     "lost": int((b & ~a).sum()), "gained": int((~b & a).sum())})
    return rows


def _scores(model, params, state, strength, candidates, kept, evals, results, seconds) -> HeadScores:
    """The HeadScores of a finished search and evaluation."""
    gain = torch.full((model.n_layers, model.n_heads), float("nan"))
    kept_map = torch.zeros(model.n_layers, model.n_heads)
    for t in state["tried"]:
        ref = HeadRef.parse(t["head"])
        gain[ref.layer, ref.head] = t["acc"] - t["reference"]
    for ref in kept:
        kept_map[ref.layer, ref.head] = 1.0
    tables = {name: accuracy_table(results["baseline"].bool(), res.bool(), evals.task, reps=params.bootstrap,
                                   seed=params.seed)
              for name, res in results.items() if name != "baseline"}
    meta = run_meta(model, seconds=seconds, step_seconds=state["seconds"], heads=[str(h) for h in kept],
                    candidates=[str(h) for h in candidates], tables=tables,
                    calib_baseline=float(torch.tensor(state["baseline_calib"]).float().mean()),
                    n_calib_items=len(state["baseline_calib"]), n_eval_items=len(evals))
    names = list(dict.fromkeys(evals.task))
    items = {f"eval_{k}": v.to(torch.uint8) for k, v in results.items()}
    items["eval_task"] = torch.tensor([names.index(t) for t in evals.task])
    return HeadScores(analysis="act_calibration", model=model.name, primary="calib_gain",
                      maps={"calib_gain": gain, "kept": kept_map, "sink_strength": strength},
                      params=params_dict(params), meta=meta, items=items)


def table_lines(scores: HeadScores) -> list[str]:
    """The accuracy tables as text lines.

    Args:
        scores: a `calibration_search` HeadScores.

    Returns:
        The lines, without newlines.
    """
    def fmt(ci) -> str:
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = []
    for name, rows in scores.meta["tables"].items():
        heads = ", ".join(scores.meta["heads"]) or "no head kept: the plain model"
        control = f"all {len(scores.meta['candidates'])} candidates"
        lines.append(f"{name}: " + (heads if name == "calibrated" else control))
        lines.append(f"  {'task':>10} {'n':>4}  {'before':>6} {'95% CI':>16}  {'after':>6} {'95% CI':>16}  "
                     f"{'change':>7} {'95% CI (paired)':>18}  lost/gained")
        for r in rows:
            lines.append(f"  {r['task']:>10} {r['n']:4d}  {r['before']:6.3f} {fmt(r['before_ci']):>16}  "
                         f"{r['after']:6.3f} {fmt(r['after_ci']):>16}  {r['delta']:+7.3f} "
                         f"{fmt(r['delta_ci']):>18}  {r['lost']}/{r['gained']}")
    return lines


