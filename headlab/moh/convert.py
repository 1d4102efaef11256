"""Convert a pretrained model to mixture-of-head attention as a head edit, and measure it against static pruning.

For each active count k of routed heads per token: the training-free query-norm router, a trained router (only its
parameters trained, `headlab.moh.train`), and static pruning of the same number of heads, (h_r − k) × routed layers,
chosen by the pruning rankers (zero ablation, least important first) — each evaluated by held-out perplexity and
multiple-choice task accuracy. Rows go to `rows.jsonl` as they are measured (a rerun skips those done); trained
routers to `routers/k<k>/`. GQA: each row records the share of (token, query head) pairs on and of (token, KV group)
pairs whose cache is read (a group is read while any of its query heads is on).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from headlab.edits import ablate, edit
from headlab.edits.moh import MoH, RandomRouter
from headlab.errors import HeadlabError
from headlab.models.head_model import HeadModel
from headlab.moh.train import RouterParams, load_router, train_router
from headlab.paths import TEXT_DIR
from headlab.results import append_jsonl, params_dict, read_json, read_jsonl, run_meta, write_json
from headlab.tasks import build_tasks, correct, encode_items, option_logprobs

HELDOUT_TEXT = TEXT_DIR / "kjv-john.txt"
ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"
ROUTERS = ("querynorm", "trained", "querynorm-group", "random")
#: what may change between runs into one folder (which rows to measure), not how rows are measured
CHOICES = ("actives", "routers", "rankers")


@dataclass(frozen=True, kw_only=True)
class ConvertParams:
    """Settings of a conversion sweep.

    Attributes:
        actives: routed heads on per token, as fractions of the routed heads (each in (0, 1]).
        shared: shared heads per layer (None: `MoH`'s default, half the KV groups' heads).
        routers: "querynorm" (training-free), "trained", and "querynorm-group" (the query-norm router choosing whole
            KV groups: measured only where k is a whole number of groups), "random" (per-token random routing, the
            null a router's choices are measured against).
        rankers: pruning rankers whose static pruning of the same number of heads is measured beside (see
            `headlab.prune.rankers`; empty for none).
        heldout: held-out text for perplexity.
        ctx: tokens per held-out window (`[windows, 1 + ctx]` tokens).
        windows: held-out windows.
        tasks: multiple-choice tasks (data/tasks).
        n_eval: items per task.
        train: how trained routers are trained (on another text than `heldout`).

    Raises:
        HeadlabError: an active fraction outside (0, 1], or an unknown router.
    """

    actives: tuple[float, ...] = (0.5, 0.67, 0.83, 1.0)
    shared: int | None = None
    routers: tuple[str, ...] = ("querynorm", "trained")
    rankers: tuple[str, ...] = ("atp", "random")
    heldout: str = str(HELDOUT_TEXT)
    ctx: int = 128
    windows: int = 8
    tasks: tuple[str, ...] = ("categories", "sentiment", "antonyms")
    n_eval: int = 40
    train: RouterParams = field(default_factory=RouterParams)

    def __post_init__(self) -> None:
        if not self.actives or any(not 0.0 < float(a) <= 1.0 for a in self.actives):
            raise HeadlabError(f"actives {self.actives} must be fractions of the routed heads in (0, 1]")
        bad = [r for r in self.routers if r not in ROUTERS]
        if bad:
            raise HeadlabError(f"unknown router(s) {bad}: choose from {', '.join(ROUTERS)}")


@dataclass
class Conversion:
    """A conversion sweep's rows (see the module doc) and its settings; `Conversion.load(out)` reads them back.

    Attributes:
        rows: one dict per (method, k): keys method ("original", "moh:<router>", "prune:<ranker>"), k, routed_on,
            heads_on, kv_read, metrics ({"loss", "ppl", "acc", "acc_<task>"}), seconds, and extras (training time,
            heads removed).
        run: the sweep's settings (params, model, shared, n_routed, ks).
    """

    rows: list[dict[str, Any]]
    run: dict[str, Any]

    @classmethod
    def load(cls, out: str | Path) -> "Conversion":
        """The sweep written into `out` (run.json and rows.jsonl), without rerunning anything.

        Args:
            out: the sweep's folder.

        Returns:
            The Conversion.

        Raises:
            ResultError: run.json missing or unreadable.
        """
        out = Path(out)
        run = read_json(out / RUN_FILE)
        return cls(rows=read_jsonl(out / ROWS_FILE), run=run)

    def table(self, metric: str = "ppl") -> dict[str, dict[int, float]]:
        """method → {k: metric}.

        Args:
            metric: a key of the rows' metrics ("ppl", "loss", "acc", ...).

        Returns:
            {method: {k: value}} over the rows that have the metric.
        """
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            if metric in r["metrics"]:
                out.setdefault(r["method"], {})[r["k"]] = r["metrics"][metric]
        return out

    def figure(self, metric: str = "ppl", *, x: str = "heads_on"):
        """One line per method: a metric against the share of heads on (`headlab.viz.moh.conversion_curves`).

        Args:
            metric: a key of the rows' metrics.
            x: "heads_on" or "routed_on".

        Returns:
            A plotly Figure.
        """
        from headlab.viz.moh import conversion_curves

        return conversion_curves(self.rows, metric=metric, x=x,
                                 title=f"MoH conversion of {self.run.get('model', '?')}: {metric}")

    def markdown(self) -> str:
        """A table: one row per (method, k) with heads on, KV groups read, perplexity and task accuracy.

        Returns:
            The Markdown table as a string.
        """
        lines = ["| method | k | routed on | heads on | KV groups read | ppl | task acc |",
                 "|---|---|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: (r["method"], r["k"])):
            m = r["metrics"]
            lines.append(f"| {r['method']} | {r['k']} | {r['routed_on']:.3f} | {r['heads_on']:.3f} | "
                         f"{r['kv_read']:.3f} | {m['ppl']:.3f} | {m.get('acc', float('nan')):.3f} |")
        return "\n".join(lines)


def _heldout_tokens(model: HeadModel, params: ConvertParams) -> torch.Tensor:
    from headlab.prune.evals import TextEval

    return TextEval(path=params.heldout, ctx=params.ctx, windows=params.windows).tokens(model)


def evaluate(model: HeadModel, tokens: torch.Tensor, items: Any, task_names: list[str]) -> dict[str, float]:
    """Held-out loss / perplexity of `tokens` and accuracy per task of encoded choice `items`, under active edits.

    Args:
        model: the (possibly edited) LM.
        tokens: held-out windows `[N, T]`.
        items: encoded multiple-choice items (`headlab.tasks.encode_items`), or None.
        task_names: the tasks whose accuracy to report.

    Returns:
        {"loss", "ppl"} and, with items, {"acc", "acc_<task>" per task}.
    """
    with torch.no_grad():
        losses = [model.loss(chunk) * len(chunk) for chunk in tokens.split(8)]
    loss = float(torch.stack(losses).sum() / len(tokens))
    out = {"loss": loss, "ppl": math.exp(loss)}
    if items is not None:
        hits = correct(option_logprobs(model, items), items.answer)
        tasks = items.task
        for name in task_names:
            rows = torch.tensor([t == name for t in tasks])
            out[f"acc_{name}"] = float(hits[rows].float().mean())
        out["acc"] = float(hits.float().mean())
    return out


def _kv_read(gates: list[torch.Tensor], n_kv: int) -> float:
    total = read = 0
    for g in gates:  # [B, T, H]
        groups = (g != 0).reshape(*g.shape[:-1], n_kv, -1).any(-1)
        total += groups.numel()
        read += int(groups.sum())
    return read / max(total, 1)


def conversion_sweep(model: HeadModel, params: ConvertParams = ConvertParams(), out: str | Path | None = None, *,
                     progress: bool = True) -> Conversion:
    """Measure MoH conversion (each router, each active count) and static pruning of as many heads.

    See the module doc. With `out`, rows are appended as measured and a rerun resumes (its settings must match).

    Args:
        model: an LM HeadModel with a tokenizer.
        params: the active counts, routers, rankers, evals and router training (`ConvertParams`).
        out: a folder for run.json, rows.jsonl and routers/ (None: nothing written).
        progress: show progress bars.

    Returns:
        A Conversion with one row per (method, k), the unrouted "original" first.

    Raises:
        HeadlabError: no LM head or tokenizer, an `out` holding a sweep with other settings, or a bad held-out text.
    """
    if not model.is_lm or model.tokenizer is None:
        raise HeadlabError(f"{model.name} needs an LM head and a tokenizer for a conversion sweep")
    probe = MoH(active=1.0, shared=params.shared)
    shared, n_routed = probe.n_shared(model), model.n_heads - probe.n_shared(model)
    layers = probe.routed_layers(model)
    ks = sorted({MoH(active=float(a), shared=params.shared).k(model) for a in params.actives})
    folder = Path(out) if out is not None else None
    identity = {"params": params_dict(params), "model": model.name, "shared": shared, "n_routed": n_routed}
    per_group = model.n_heads // model.n_kv_heads
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        old = read_json(folder / RUN_FILE, missing_ok=True)
        if old is not None:
            old_params = {k: v for k, v in old.get("params", {}).items() if k not in CHOICES}
            mismatch = [key for key in identity if key != "params" and old.get(key) != identity[key]]
            mismatch += [f"params.{k}" for k, v in identity["params"].items()
                         if k not in CHOICES and old_params.get(k) != v]
            if mismatch:
                raise HeadlabError(f"{folder} holds a sweep with other settings ({', '.join(mismatch)}): use another "
                                   "--out")
        write_json(folder / RUN_FILE, {**identity, "meta": run_meta(model), "ks": ks})
        done = {(r["method"], r["k"]): r for r in read_jsonl(folder / ROWS_FILE)}
    rows = list(done.values())

    tokens = _heldout_tokens(model, params)
    items = None
    if params.tasks:
        splits = build_tasks(params.tasks, n_calib=0, n_eval=params.n_eval, seed=0)
        items = encode_items(model, [it for s in splits for it in s.evaluation])

    def record(method: str, k: int, heads_on: float, kv_read: float, metrics: dict[str, float], **extra) -> None:
        row = {"method": method, "k": k, "routed_on": k / n_routed, "heads_on": heads_on, "kv_read": kv_read,
               "metrics": metrics, **extra}
        rows.append(row)
        done[(method, k)] = row
        if folder is not None:
            append_jsonl(folder / ROWS_FILE, row)

    jobs = [("original", n_routed)] + [(f"moh:{r}", k) for r in params.routers for k in ks
                                        if r != "querynorm-group" or (k % per_group == 0 and shared % per_group == 0)] + \
           [(f"prune:{r}", k) for r in params.rankers for k in ks]
    todo = [j for j in jobs if j not in done]
    rankings: dict[str, Any] = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="MoH conversion", disable=not progress)
    for method, k in todo:
        start = time.perf_counter()
        if method == "original":
            record(method, k, 1.0, 1.0, evaluate(model, tokens, items, list(params.tasks)),
                   seconds=round(time.perf_counter() - start, 2))
        elif method.startswith("moh:"):
            router, extra = (RandomRouter() if method == "moh:random" else None), {}
            if method == "moh:trained" and k < n_routed:
                router_dir = folder / "routers" / f"k{k}" if folder is not None else None
                router, state = train_router(model, MoH(active=k, shared=params.shared), params.train,
                                             out=router_dir, progress=progress)
                extra = {"train_seconds": state["seconds"], "train_curve_end": state["curve"][-1]}
            seen: list[torch.Tensor] = []
            moh = MoH(active=k, shared=params.shared, router=router,
                      unit="group" if method == "moh:querynorm-group" else "head",
                      on_route=lambda layer, s, g: seen.append(g.detach()))
            with edit(model, moh):
                metrics = evaluate(model, tokens, items, list(params.tasks))
            heads_on = (shared + k) / model.n_heads * len(layers) / model.n_layers + \
                (model.n_layers - len(layers)) / model.n_layers
            record(method, k, heads_on, _kv_read(seen, model.n_kv_heads), metrics,
                   seconds=round(time.perf_counter() - start, 2), **extra)
        else:
            from headlab.prune.rankers import prune_order, rank

            ranker = method.removeprefix("prune:")
            if ranker not in rankings:
                rankings[ranker] = rank(model, ranker)
            n_remove = (n_routed - k) * len(layers)
            heads = prune_order(rankings[ranker].scores)[:n_remove]
            kept = torch.ones(model.n_layers, model.n_heads, dtype=torch.bool)
            for h in heads:
                kept[h.layer, h.head] = False
            kv = float(kept.reshape(model.n_layers, model.n_kv_heads, -1).any(-1).float().mean())
            with edit(model, ablate(heads)):
                metrics = evaluate(model, tokens, items, list(params.tasks))
            record(method, k, float(kept.float().mean()), kv, metrics, n_removed=n_remove,
                   seconds=round(time.perf_counter() - start, 2))
        bar.update(1)
    bar.close()
    order = {j: i for i, j in enumerate(jobs)}
    rows = sorted((r for r in rows if (r["method"], r["k"]) in order), key=lambda r: order[(r["method"], r["k"])])
    return Conversion(rows=rows, run={**identity, "ks": ks})


def trained_router(out: str | Path, k: int):
    """The router a sweep trained for k routed heads per token (from `<out>/routers/k<k>`).

    Args:
        out: the sweep's folder.
        k: routed heads per token.

    Returns:
        The LearnedRouter (use it as `MoH(active=k, router=...)`).

    Raises:
        ResultError: no router saved for that k.
    """
    return load_router(Path(out) / "routers" / f"k{k}")[0]
