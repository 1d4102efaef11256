"""Head rankers for pruning: analysis scores, exhaustive single-head ablation, attribution patching, random.

Every ranker returns a HeadScores whose primary map `score` `[L, H]` says how much a head matters;
pruning removes the LOWEST scores first (`prune_order`), ties broken by (layer, head), NaN last.
The ranking is computed once on the unpruned model (not re-ranked as heads go).

- induction / sink: the induction scan's `induction` / `first_token` maps (`[BOS] r r`).
- scores:PATH[:MAP]: any saved HeadScores folder (retrieval, sink scores of other analyses).
- ablation: loss increase when one head alone is zero-ablated, one forward per head.
- atp: attribution patching, the first-order estimate of the same quantity from one forward and
  one backward: every head's output is multiplied by a factor a = 1 that requires grad, and
  ΔL(zero head h) ≈ L(a_h = 0) − L(a_h = 1) ≈ −∂L/∂a_h.
- random: a seeded random order (the baseline).
Other analyses add theirs with `register_ranker(name, fn)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from headlab.analyses.induction import InductionParams, induction_scan
from headlab.analyses.metrics import spearman

from headlab.edits.heads import Ablate, Scale, edit
from headlab.errors import HeadlabError
from headlab.heads import HeadRef, as_heads
from headlab.models.head_model import HeadModel
from headlab.prune.evals import Eval, default_calibration, parse_eval
from headlab.results import HeadScores, params_dict, run_meta

DIRECTION = "ascending: the lowest-scoring heads are pruned first"


@dataclass(frozen=True, kw_only=True)
class RankParams:
    """Settings of the rankers.

    Attributes:
        calib: eval spec whose loss the ablation and AtP rankers measure (None: KJV Genesis 1–15 for
            models with a tokenizer, else task:induction). Keep it apart from the held-out evals.
        ctx: the calibration text's window length (`[windows, 1 + ctx]` tokens).
        windows: the calibration text's window count.
        calib_seed: token seed when the calibration is a task (the task eval uses another seed).
        calib_seq_len: block length when the calibration is a task.
        seed: seed of the random ranker and of the induction scan.
        scan_seq_len: the induction scan's block length.
        scan_batch: the induction scan's number of sequences.
    """

    calib: str | None = None
    ctx: int = 64
    windows: int = 4
    calib_seed: int = 2
    calib_seq_len: int = 32
    seed: int = 0
    scan_seq_len: int = 32
    scan_batch: int = 8

    def calibration(self, model: HeadModel) -> Eval:
        """The calibration eval for `model`.

        Args:
            model: the model to rank (its tokenizer decides the default calibration).

        Returns:
            A TextEval or InductionTask (`parse_eval` of `calib` or the default).

        Raises:
            HeadlabError: an unknown calibration spec.
        """
        return parse_eval(self.calib or default_calibration(model), ctx=self.ctx, windows=self.windows,
                          seed=self.calib_seed, seq_len=self.calib_seq_len)


RankerFn = Callable[[HeadModel, RankParams, dict], HeadScores]
RANKERS: dict[str, RankerFn] = {}


def register_ranker(name: str, fn: RankerFn) -> None:
    """Add a ranker `fn(model, params, cache) -> HeadScores` (primary map: importance `[L, H]`).

    `cache` is a dict shared by the rankers of one experiment (the induction scan is kept there for
    both `induction` and `sink`); its key "progress" says whether progress bars are wanted.

    Args:
        name: the ranker's name (replaces a ranker of the same name).
        fn: `fn(model, params, cache) -> HeadScores`.
    """
    RANKERS[name] = fn


def _ranking(model: HeadModel, name: str, maps: dict[str, torch.Tensor], params: RankParams,
             **meta) -> HeadScores:
    return HeadScores(analysis=f"prune_rank:{name}", model=model.name, maps=maps, primary="score",
                      params={"ranker": name, **params_dict(params)},
                      meta=run_meta(model, direction=DIRECTION, **meta))


def _scan(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    if "induction_scan" not in cache:
        scan_params = InductionParams(seq_len=params.scan_seq_len, batch=params.scan_batch, seed=params.seed)
        cache["induction_scan"] = induction_scan(model, scan_params, progress=False)
    return cache["induction_scan"]


def _induction(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    return _ranking(model, "induction", {"score": _scan(model, params, cache).maps["induction"]}, params,
                    source="induction scan, map induction")


def _sink(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    return _ranking(model, "sink", {"score": _scan(model, params, cache).maps["first_token"]}, params,
                    source="induction scan, map first_token (mean attention on position 0)")


def _random(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    gen = torch.Generator().manual_seed(params.seed)
    scores = torch.randperm(model.n_layers * model.n_heads, generator=gen).float()
    return _ranking(model, "random", {"score": scores.view(model.n_layers, model.n_heads)}, params,
                    seed=params.seed)


def ablation_scores(model: HeadModel, calib: Eval, *, heads: Iterable[HeadRef] | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor | float]:
    """Exhaustive single-head zero ablation: `delta` `[L, H]` = loss(head zeroed) − clean loss.

    Args:
        model: the HeadModel.
        calib: the eval whose loss is measured (`RankParams.calibration`).
        heads: only these heads (the others are NaN); all by default.
        progress: show a progress bar.

    Returns:
        {"delta": `[L, H]` loss increases, "clean_loss": the unablated loss}.
    """
    clean = float(calib.loss(model))
    delta = torch.full((model.n_layers, model.n_heads), float("nan"))
    refs = model.heads() if heads is None else as_heads(heads)
    for ref in tqdm(refs, desc="ablate each head", disable=not progress, leave=False):
        with edit(model, Ablate(ref)):
            delta[ref.layer, ref.head] = float(calib.loss(model)) - clean
    return {"delta": delta, "clean_loss": clean}


def atp_scores(model: HeadModel, calib: Eval) -> dict[str, torch.Tensor | float]:
    """Attribution patching: `estimate` `[L, H]` ≈ loss(head zeroed) − clean loss, from one forward + backward.

    Each head's output (its slice of the output-projection input, as `Ablate(how="zero")` acts on) is
    scaled by a factor a = 1 that requires grad; zeroing the head moves a from 1 to 0, so the
    first-order change of the loss is −∂L/∂a. Parameters get no gradient (`torch.autograd.grad`).

    Args:
        model: the HeadModel.
        calib: the eval whose loss is differentiated.

    Returns:
        {"estimate": `[L, H]` = −∂L/∂a, "clean_loss": the unedited loss}.
    """
    alpha = torch.ones(model.n_layers, model.n_heads, requires_grad=True)
    with edit(model, [Scale(h, factor=alpha[h.layer, h.head]) for h in model.heads()]):
        loss = calib.loss(model, grad=True)
    (grad,) = torch.autograd.grad(loss, alpha)
    return {"estimate": -grad.detach(), "clean_loss": float(loss.detach())}


def _ablation(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    calib = params.calibration(model)
    start = time.perf_counter()
    out = ablation_scores(model, calib, progress=cache.get("progress", True))
    return _ranking(model, "ablation", {"score": out["delta"]}, params, calibration=calib.spec,
                    clean_loss=out["clean_loss"], seconds=round(time.perf_counter() - start, 3),
                    forwards=model.n_layers * model.n_heads + 1)


def _atp(model: HeadModel, params: RankParams, cache: dict) -> HeadScores:
    calib = params.calibration(model)
    start = time.perf_counter()
    out = atp_scores(model, calib)
    return _ranking(model, "atp", {"score": out["estimate"]}, params, calibration=calib.spec,
                    clean_loss=out["clean_loss"], seconds=round(time.perf_counter() - start, 3), forwards=1,
                    backwards=1)


for _name, _fn in {"induction": _induction, "sink": _sink, "ablation": _ablation, "atp": _atp,
                   "random": _random}.items():
    register_ranker(_name, _fn)


def from_saved(model: HeadModel, spec: str) -> HeadScores:
    """A ranking from `scores:PATH[:MAP]` (a saved HeadScores folder; its primary map unless MAP is given)."""
    rest = spec.removeprefix("scores:")
    path, key = rest, None
    if not Path(rest).exists() and ":" in rest:
        path, key = rest.rsplit(":", 1)
    if not (Path(path) / "scores.json").is_file():
        raise HeadlabError(f"{spec}: {path} is not a saved HeadScores folder (no scores.json)")
    saved = HeadScores.load(path)
    key = key or saved.primary
    if key not in saved.maps:
        raise HeadlabError(f"{spec}: no map {key!r} in {path}; it has {', '.join(sorted(saved.maps))}")
    scores = saved.maps[key]
    if tuple(scores.shape) != (model.n_layers, model.n_heads):
        raise HeadlabError(f"{spec}: map {key!r} is {tuple(scores.shape)}, but {model.name} has "
                           f"[{model.n_layers}, {model.n_heads}] heads")
    return _ranking(model, spec, {"score": scores}, RankParams(), source=f"{path} map {key} ({saved.analysis})",
                    source_model=saved.model)


def check_ranker(name: str) -> None:
    """A HeadlabError naming the problem if `name` is no registered ranker and no saved scores folder."""
    if name.startswith("scores:"):
        rest = name.removeprefix("scores:")
        path = rest if Path(rest).exists() or ":" not in rest else rest.rsplit(":", 1)[0]
        if not HeadScores.saved(path):
            raise HeadlabError(f"{name}: {path} is not a saved HeadScores folder (no readable scores.json)")
        return
    if name not in RANKERS:
        hint = (" No retrieval analysis is registered in this checkout: save its HeadScores and pass "
                "scores:PATH:retrieval." if name == "retrieval" else "")
        raise HeadlabError(f"unknown ranker {name!r}: use one of {', '.join(RANKERS)} or scores:PATH[:MAP].{hint}")


def rank(model: HeadModel, name: str, params: RankParams = RankParams(), *, cache: dict | None = None) -> HeadScores:
    """Rank every head of `model` with the named ranker (or `scores:PATH[:MAP]`); see the module doc.

    Args:
        model: the HeadModel to rank.
        name: a registered ranker (`RANKERS`) or `scores:PATH[:MAP]`.
        params: the rankers' settings.
        cache: a dict shared by the rankers of one experiment (holds the induction scan).

    Returns:
        HeadScores with primary map "score" `[L, H]` (higher = more important); `meta["seconds"]` the time taken.

    Raises:
        HeadlabError: an unknown ranker, or a `scores:` folder that is missing or does not fit the model.
    """
    if name.startswith("scores:"):
        return from_saved(model, name)
    check_ranker(name)
    start = time.perf_counter()
    result = RANKERS[name](model, params, cache if cache is not None else {})
    result.meta.setdefault("seconds", round(time.perf_counter() - start, 3))
    return result


def prune_order(scores: torch.Tensor) -> list[HeadRef]:
    """Every head of a `[L, H]` importance map, least important first (ties by (layer, head), NaN last).

    Args:
        scores: `[L, H]` importance.

    Returns:
        All L · H heads in pruning order.
    """
    n_heads = scores.shape[1]
    flat = scores.detach().float().flatten().cpu()
    keys = [(bool(torch.isnan(v)), float(v) if not torch.isnan(v) else 0.0, i) for i, v in enumerate(flat)]
    return [HeadRef(i // n_heads, i % n_heads) for _, _, i in sorted(keys)]


def n_to_remove(fraction: float, n_total: int) -> int:
    """How many heads a fraction removes: round(fraction × n_total) (round half to even).

    Args:
        fraction: in [0, 1].
        n_total: the number of heads.

    Returns:
        The count.

    Raises:
        HeadlabError: a fraction outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise HeadlabError(f"fraction {fraction} is outside [0, 1]")
    return int(round(fraction * n_total))


def compare_atp(atp: HeadScores, ablation: HeadScores, *, k: int = 10) -> dict[str, float]:
    """How well AtP's estimate tracks exhaustive ablation: Spearman, top-k overlap, and the speed-up.

    Heads left NaN by a partial exhaustive run are skipped; the speed-up then extrapolates the
    exhaustive time per head to all heads.

    Args:
        atp: the "atp" ranking.
        ablation: the "ablation" ranking.
        k: the top-k whose overlap is measured.

    Returns:
        {"heads", "spearman", "pearson", "k", "top_k_overlap"} and, when both rankings carry their times,
        {"atp_seconds", "ablation_seconds", "speedup"}.
    """
    keep = ~(atp.scores.isnan() | ablation.scores.isnan())  # a partial exhaustive run leaves NaN
    a, b = atp.scores[keep], ablation.scores[keep]
    k = min(k, a.numel())
    top = lambda s: set(s.argsort(descending=True)[:k].tolist())  # noqa: E731
    out = {"heads": int(keep.sum()), "spearman": spearman(a, b),
           "pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
           "k": k, "top_k_overlap": len(top(a) & top(b)) / k}
    if atp.meta.get("seconds") and ablation.meta.get("seconds"):
        full = ablation.meta["seconds"] * keep.numel() / int(keep.sum())
        out.update(atp_seconds=atp.meta["seconds"], ablation_seconds=full, speedup=full / atp.meta["seconds"])
    return out
