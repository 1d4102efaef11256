"""Scripted head-pruning experiments: rank heads, remove them progressively, evaluate, plot; resumable.

For each ranker, the heads are ordered least important first (`rankers.prune_order`) once, on the
unpruned model; removing a fraction f masks the first round(f · L · H) of them (`removed_heads`; zero ablation inside
an edit scope, so the model is restored after each evaluation). Each (ranker, fraction, eval) is one
row of `results.jsonl`; a rerun with the same `--out` skips the rows already there and reuses the
rankings saved under `rankings/`. `run.json` holds the settings (seeds included) and refuses a rerun
whose settings would make old and new rows incomparable.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from headlab.edits.heads import ablate, edit
from headlab.errors import HeadlabError
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel
from headlab.prune.evals import parse_eval
from headlab.viz.prune import curves
from headlab.prune.rankers import RankParams, check_ranker, compare_atp, n_to_remove, prune_order, rank
from headlab.results import HeadScores, append_jsonl, read_json, read_jsonl, write_json, params_dict

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"


@dataclass(frozen=True, kw_only=True)
class PruneParams:
    """Settings of a pruning experiment.

    Attributes:
        rankers: ranker names (see `headlab.prune.rankers`), or `scores:PATH[:MAP]`.
        fractions: fractions of all heads to remove, each in [0, 1].
        evals: eval specs (`ppl:FILE`, `task:induction`).
        ctx: tokens per held-out text window of a `ppl:` eval.
        windows: windows per `ppl:` eval (`[windows, 1 + ctx]` tokens).
        task_seed: token seed of `task:` evals.
        task_seq_len: block length N of `task:` evals.
        rank: the rankers' settings (calibration data and seeds).
    """

    rankers: tuple[str, ...]
    fractions: tuple[float, ...]
    evals: tuple[str, ...]
    ctx: int = 128
    windows: int = 8
    task_seed: int = 1
    task_seq_len: int = 32
    rank: RankParams = field(default_factory=RankParams)

    def identity(self) -> dict[str, Any]:
        """The settings that must match for rows of two runs to share one results file.

        Returns:
            {"ctx", "windows", "task_seed", "task_seq_len", "rank"} (rank as a dict).
        """
        return {"ctx": self.ctx, "windows": self.windows, "task_seed": self.task_seed,
                "task_seq_len": self.task_seq_len, "rank": params_dict(self.rank)}


@dataclass
class PruneResults:
    """What an experiment wrote: the rows, the rankings, and the AtP-vs-ablation comparison if both ran.

    Attributes:
        out: the experiment's folder.
        rows: one dict per (ranker, fraction, eval): keys ranker, fraction, eval, primary, value, metrics,
            n_removed, n_heads, removed (head strings), seed, task_seed, seconds, model, time.
        rankings: {ranker: its HeadScores} (higher = more important; pruned lowest first).
        atp_vs_ablation: `compare_atp` of the "atp" and "ablation" rankings when both ran, else None.
    """

    out: Path
    rows: list[dict[str, Any]]
    rankings: dict[str, HeadScores]
    atp_vs_ablation: dict[str, float] | None = None

    def figure(self, eval_spec: str | None = None):
        """Metric against fraction removed, one line per ranker (the first eval by default).

        Args:
            eval_spec: the eval whose rows to plot (default: the first row's).

        Returns:
            A plotly Figure (`headlab.viz.prune.curves`).
        """
        spec = eval_spec or self.rows[0]["eval"]
        return curves([r for r in self.rows if r["eval"] == spec], title=f"{spec}")

    @classmethod
    def load(cls, out: str | Path) -> "PruneResults":
        """The results an experiment wrote into `out` (rows, rankings, AtP comparison), without rerunning anything.

        Args:
            out: the experiment's folder (with run.json).

        Returns:
            The PruneResults.
        """
        out = Path(out)
        run = read_json(out / RUN_FILE)
        rankers = dict.fromkeys(name for r in run.get("runs", []) for name in r.get("rankers", []))
        rankings = {name: HeadScores.load(out / "rankings" / slug(name)) for name in rankers
                    if HeadScores.saved(out / "rankings" / slug(name))}
        return cls(out=out, rows=read_rows(out), rankings=rankings,
                   atp_vs_ablation=read_json(out / "atp_vs_ablation.json", missing_ok=True))

    def mask(self, ranker: str, fraction: float) -> list[HeadRef]:
        """The heads this experiment removes (zero-ablates) for `ranker` at `fraction`.

        This is `removed_heads` of its saved ranking: the same heads as its rows' `removed`, at any fraction in
        [0, 1].

        Args:
            ranker: a ranker of this experiment.
            fraction: the fraction of all heads removed.

        Returns:
            The removed heads, least important first.

        Raises:
            HeadlabError: a ranker this experiment has no ranking for.
        """
        if ranker not in self.rankings:
            raise HeadlabError(f"{self.out} has no ranking {ranker!r}: its rankers are {', '.join(self.rankings)}")
        return removed_heads(self.rankings[ranker], fraction)

    def table(self, eval_spec: str | None = None) -> dict[str, dict[float, float]]:
        """{ranker: {fraction: primary metric}} for one eval (the first by default).

        Args:
            eval_spec: the eval (default: the first row's).

        Returns:
            {ranker: {fraction: value}}, fractions ascending.
        """
        spec = eval_spec or self.rows[0]["eval"]
        out: dict[str, dict[float, float]] = {}
        for r in self.rows:
            if r["eval"] == spec:
                out.setdefault(r["ranker"], {})[r["fraction"]] = r["value"]
        return {k: dict(sorted(v.items())) for k, v in out.items()}


def slug(name: str) -> str:
    """A file-name-safe form of a ranker or eval name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "x"


def removed_heads(ranking: HeadScores, fraction: float) -> list[HeadRef]:
    """The heads a pruning experiment removes at `fraction` for one ranking.

    The first round(fraction · L · H) of `prune_order` (least important first); `prune_experiment`,
    `PruneResults.mask` and `--save-model` all use it.

    Args:
        ranking: a ranker's HeadScores (primary map: importance `[L, H]`).
        fraction: the share of all heads removed, in [0, 1].

    Returns:
        The removed heads, least important first.

    Raises:
        HeadlabError: `fraction` lies outside [0, 1].
    """
    return prune_order(ranking.scores)[:n_to_remove(fraction, ranking.scores.numel())]


def prune_edits(heads: list[HeadRef]) -> list:
    """The edits that remove `heads` in a pruning experiment: zero ablation of each (open with `edit`).

    Args:
        heads: the heads to remove.

    Returns:
        One zero `Ablate` per head.
    """
    return ablate(heads)


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """The rows of `results.jsonl` in `out` (none if absent; a torn last line is skipped).

    Args:
        out: the experiment's folder.

    Returns:
        The rows, as dicts, in the order written.
    """
    return read_jsonl(Path(out) / RESULTS_FILE)


def _check_run(out: Path, model: HeadModel, params: PruneParams) -> None:
    path = out / RUN_FILE
    identity = {"model": model.name, **params.identity()}
    old = read_json(path, missing_ok=True)
    if old is not None:
        if old.get("identity") != json.loads(json.dumps(identity)):
            raise HeadlabError(f"{out} holds a run with other settings ({old.get('identity')}); rows would not be "
                               f"comparable with {identity}: use another --out")
        runs = old.get("runs", [])
    else:
        runs = []
    runs.append({"time": _now(), "rankers": list(params.rankers), "fractions": list(params.fractions),
                 "evals": list(params.evals)})
    write_json(path, {"identity": identity, "params": params_dict(params), "direction": "lowest score pruned first",
                      "weights_note": model.note, "runs": runs})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def get_ranking(model: HeadModel, name: str, params: RankParams, out: Path | None, cache: dict) -> HeadScores:
    """A ranking, loaded from `out/rankings/<name>/` when saved there, else computed (and saved)."""
    folder = out / "rankings" / slug(name) if out is not None else None
    if folder is not None and HeadScores.saved(folder):
        return HeadScores.load(folder)
    result = rank(model, name, params, cache=cache)
    if folder is not None:
        result.save(folder)
    return result


@dataclass
class PruneWorker:
    """Measures one (removed heads, eval) unit: the eval's metrics with those heads zero-ablated in a scope."""

    model: HeadModel
    evals: dict[str, Any]

    def __call__(self, job: tuple[tuple[str, ...], str]) -> tuple[dict[str, float], float]:
        """(metrics, seconds) of eval `job[1]` with heads `job[0]` ("L3H1", …) removed."""
        removed, spec = job
        start = time.perf_counter()
        with edit(self.model, prune_edits([HeadRef.parse(h) for h in removed])):
            metrics = self.evals[spec].metrics(self.model)
        return metrics, round(time.perf_counter() - start, 3)


@dataclass(frozen=True)
class PruneWorkerSpec:
    """A picklable recipe for a PruneWorker in another process (a Ray actor): load `source`, build the evals."""

    source: str
    params: PruneParams

    def __call__(self) -> PruneWorker:
        from headlab.models import load

        p = self.params
        evals = {spec: parse_eval(spec, ctx=p.ctx, windows=p.windows, seed=p.task_seed, seq_len=p.task_seq_len)
                 for spec in p.evals}
        return PruneWorker(load(self.source), evals)


def prune_experiment(model: HeadModel, params: PruneParams, out: str | Path, *,
                     progress: bool = True, executor: Any = None) -> PruneResults:
    """Run (or resume) a pruning experiment into folder `out`; see the module doc.

    Args:
        model: the HeadModel to prune (restored after every evaluation).
        params: rankers, fractions, evals and their settings.
        out: the folder for run.json, results.jsonl, rankings/ and one curve_<eval>.html per eval.
        progress: show a progress bar (fed by finished rows).
        executor: where the (removed heads, eval) units run: None / `headlab.executors.LocalExecutor` (this process,
            on `model`), or a `RayExecutor` (each worker loads `model.source` once; rows are written here as their
            units finish, so an interrupted run resumes either way).

    Returns:
        PruneResults with every row in `out` (earlier runs' included).

    Raises:
        HeadlabError: an unknown ranker or eval, no ranker / fraction / eval, or an `out` holding a run with other
            settings; a Ray executor for a model that was not loaded from a name or a folder.
    """
    out = Path(out)
    # validate everything before the folder is made or run.json is written: a refused command leaves nothing behind
    evals = {spec: parse_eval(spec, ctx=params.ctx, windows=params.windows, seed=params.task_seed,
                              seq_len=params.task_seq_len)
             for spec in params.evals}
    for name in params.rankers:
        check_ranker(name)
    if not params.rankers or not params.fractions or not params.evals:
        raise HeadlabError("a pruning experiment needs at least one ranker, fraction and eval")
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, model, params)
    cache: dict[str, Any] = {"progress": progress}
    rankings = {name: get_ranking(model, name, params.rank, out, cache) for name in params.rankers}
    n_total = model.n_layers * model.n_heads

    rows = read_rows(out)
    done = {(r["ranker"], r["fraction"], r["eval"]) for r in rows}
    jobs = [(n, f, e) for n in params.rankers for f in params.fractions for e in params.evals
            if (n, f, e) not in done]
    memo = {(frozenset(r["removed"]), r["eval"]): r for r in rows}
    bar = tqdm(total=len(jobs), desc=f"prune {model.name}", disable=not progress)

    def write(name: str, fraction: float, spec: str, removed: list[HeadRef], metrics: dict, seconds: float) -> None:
        # rows are appended one by one (flushed, fsynced; a torn last line is ended first)
        row = {"ranker": name, "fraction": fraction, "eval": spec, "primary": evals[spec].primary,
               "value": metrics[evals[spec].primary], "metrics": metrics, "n_removed": len(removed),
               "n_heads": n_total, "removed": [str(h) for h in removed], "seed": params.rank.seed,
               "task_seed": params.task_seed, "seconds": seconds, "model": model.name, "time": _now()}
        append_jsonl(out / RESULTS_FILE, row)
        rows.append(row)
        memo[(frozenset(row["removed"]), spec)] = row
        bar.update(1)

    waiting: dict[tuple[tuple[str, ...], str], list] = {}  # one unit per distinct (heads, eval): rows that share it
    for name, fraction, spec in jobs:
        removed = removed_heads(rankings[name], fraction)
        key = (frozenset(str(h) for h in removed), spec)
        if key in memo:  # the same heads were already measured (e.g. fraction 0 of another ranker)
            write(name, fraction, spec, removed, memo[key]["metrics"], 0.0)
        else:
            waiting.setdefault((tuple(sorted(str(h) for h in removed)), spec), []).append((name, fraction, removed))

    def on_result(unit: tuple[tuple[str, ...], str], result: tuple[dict, float]) -> None:
        metrics, seconds = result
        for name, fraction, removed in waiting[unit]:
            write(name, fraction, unit[1], removed, metrics, seconds)

    if waiting:
        from headlab.executors import LocalExecutor

        executor = executor or LocalExecutor()
        if executor.name == "local":
            factory: Any = lambda: PruneWorker(model, evals)  # noqa: E731 (this process: the model already loaded)
        else:
            from headlab.models.loading import worker_source

            factory = PruneWorkerSpec(worker_source(model, executor.name), params)
        executor.run(factory, list(waiting), on_result)
    bar.close()

    comparison = None
    if "atp" in rankings and "ablation" in rankings:
        comparison = compare_atp(rankings["atp"], rankings["ablation"])
        write_json(out / "atp_vs_ablation.json", comparison)
    result = PruneResults(out=out, rows=rows, rankings=rankings, atp_vs_ablation=comparison)
    for spec in params.evals:
        result.figure(spec).write_html(out / f"curve_{slug(spec)}.html", include_plotlyjs="cdn")
    return result


def parse_fractions(text: str) -> tuple[float, ...]:
    """`0,0.05,...,0.5` → (0, 0.05, …, 0.5): comma-separated values, `...` continues the first step.

    Args:
        text: comma-separated fractions, optionally `a,b,...,z`.

    Returns:
        The fractions (sorted and distinct when `...` is used).

    Raises:
        HeadlabError: values that are not numbers, a misplaced `...`, or a non-positive step.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2:
            raise HeadlabError(f"cannot read fractions {text!r}: write a,b,...,z (two values, '...', the last)")
        a, b, z = float(parts[0]), float(parts[1]), float(parts[-1])
        step = b - a
        if step <= 0:
            raise HeadlabError(f"fractions {text!r}: the step must be positive")
        n = int(round((z - a) / step))
        values = [round(a + k * step, 10) for k in range(n + 1)]
        values += [float(p) for p in parts[2:i]]
        return tuple(sorted(set(values)))
    try:
        return tuple(float(p) for p in parts)
    except ValueError as err:
        raise HeadlabError(f"cannot read fractions {text!r}: {err}") from None
