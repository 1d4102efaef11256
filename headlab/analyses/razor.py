"""RazorAttention's head scores, and the conditions, summaries and figures of the retrieval-head experiments.

Echo and induction scores on repeated random tokens select RazorAttention's retrieval KV heads;
`Condition`s (heads masked, a KV policy) are what the needle harness (`analyses.retrieval`) decodes
under; `summarize`, the figures and `RetrievalReport` turn its per-trial records into results.

The input is `[BOS] r r r r`: K random content tokens repeated `repeats` (4) times. For each query i
in repeats 2..R and each earlier copy j of its token (j = i - mK, m >= 1):
- echo score: the attention A[i, j] on the earlier copies of the same token (summed over copies);
- induction score: the attention A[i, j + 1] on the token after each earlier copy;
each averaged over the queries of repeats 2..R. Nothing T×T is built: each layer is reduced to the
row log-sum-exp (`HeadModel.stats`) and the exact weights of the chosen (query, key) pairs.

Under grouped-query attention a KV head's score is the max over its query heads. The retrieval KV
heads are the union of the top `induction_ratio` (14%) by induction and the top `echo_ratio` (1%) by
echo, each ranked over all layers × KV heads, with round(ratio × count) heads taken.

Differences from the authors' code (MindSpore golden-stick), none of which changes a ranking: their
score is the masked pattern's mean over the whole S × S matrix (a constant factor away from the
mean over queries), their masks also count the last query of the first copy (against BOS and
position 1), and their union step returns after merging the first layer of echo heads (a bug;
here the union is complete, as the paper describes). Their K is 2,500 tokens from a fixed id range;
here K is a parameter (256 by default, for CPU) drawn from the model's non-special tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from headlab.analyses.induction import content_token_ids
from headlab.edits.heads import Ablate
from headlab.edits.kv_policy import RazorKV
from headlab.errors import PromptError
from headlab.heads import HeadRef, heads_per_group
from headlab.models.head_model import HeadModel
from headlab.results import HeadScores, params_dict, read_json, run_meta, write_json
from headlab.stats import pair_weights
from headlab.inputs import repeated_blocks
from headlab.viz.retrieval import accuracy_grid, kv_figure, masking_figure

MAPS = ("echo", "induction")


@dataclass(frozen=True, kw_only=True)
class RazorParams:
    """Settings of the echo/induction scan and of the retrieval-head selection.

    Attributes:
        block: K, the random tokens of one repeat (2,500 in the authors' code).
        repeats: how many times the block is repeated (4).
        batch: number of random sequences (scores are averaged over them).
        seed: seed of the token sampler.
        induction_ratio: share of KV heads kept as retrieval heads by induction score (0.14).
        echo_ratio: share of KV heads kept by echo score (0.01).
        impl: head-statistics implementation ("auto": Triton on CUDA, the torch reference elsewhere).
    """

    block: int = 256
    repeats: int = 4
    batch: int = 1
    seed: int = 0
    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    impl: str = "auto"


def repeated_random(model: HeadModel, *, block: int, repeats: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """`[batch, 1 + repeats*block]` token ids: BOS, then one random block repeated `repeats` times.

    Args:
        model: the model whose content tokens and BOS (else pad) id to use.
        block: K, the random block's length.
        repeats: how many times it is repeated.
        batch: number of sequences.
        seed: seed of the token sampler.

    Returns:
        A LongTensor `[batch, 1 + repeats·block]`.

    Raises:
        PromptError: block < 2, repeats < 2, batch < 1, or a sequence longer than the model's context.
    """
    if block < 2 or repeats < 2 or batch < 1:
        raise PromptError(f"repeated random tokens need block >= 2, repeats >= 2, batch >= 1; got block={block}, "
                          f"repeats={repeats}, batch={batch}")
    total = 1 + repeats * block
    if model.max_context is not None and total > model.max_context:
        raise PromptError(f"1 + {repeats}×{block} = {total} tokens exceed {model.name}'s context of "
                          f"{model.max_context}")
    bos = model.bos_id if model.bos_id is not None else model.pad_id
    return repeated_blocks(content_token_ids(model), batch=batch, block=block, repeats=repeats, bos=bos,
                           generator=torch.Generator().manual_seed(seed))


def _layer_scores(record, stats, block: int, repeats: int) -> dict[str, torch.Tensor]:
    """Echo and induction scores `[B, H]` of one layer, from exact pair weights."""
    dev = record.q.device
    echo, induction = 0.0, 0.0
    for r in range(1, repeats):  # repeat r + 1 (0-based r), queries at 1 + r*K .. (r+1)*K
        queries = torch.arange(1 + r * block, 1 + (r + 1) * block, device=dev)
        for m in range(1, r + 1):
            echo = echo + pair_weights(record, stats.lse, queries, queries - m * block)  # [B, H, K]
            induction = induction + pair_weights(record, stats.lse, queries, queries - m * block + 1)
    n = (repeats - 1) * block
    return {"echo": echo.sum(-1).cpu() / n, "induction": induction.sum(-1).cpu() / n}


def per_kv_head(scores: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """`[L, H]` query-head scores → `[L, G]`: the max over each KV head's query heads.

    Args:
        scores: `[L, H]`.
        n_kv_heads: G.

    Returns:
        `[L, G]`.
    """
    n_layers, n_heads = scores.shape
    return scores.view(n_layers, n_kv_heads, heads_per_group(n_heads, n_kv_heads)).amax(-1)


def top_share(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the round(ratio × numel) highest entries of a map (ranked over all of it).

    Args:
        scores: any map (NaN ranks last).
        ratio: the share of entries kept.

    Returns:
        A bool tensor of scores' shape.
    """
    flat = scores.flatten()
    k = round(ratio * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[flat.nan_to_num(float("-inf")).topk(k).indices] = True
    return mask.view_as(scores)


def select_retrieval_kv(echo_kv: torch.Tensor, induction_kv: torch.Tensor, *, echo_ratio: float = 0.01,
                        induction_ratio: float = 0.14) -> frozenset[tuple[int, int]]:
    """RazorAttention's retrieval KV heads: top share by induction ∪ top share by echo, as (layer, group).

    Args:
        echo_kv: `[L, G]` echo scores per KV head.
        induction_kv: `[L, G]` induction scores per KV head.
        echo_ratio: the share kept by echo score.
        induction_ratio: the share kept by induction score.

    Returns:
        The set of (layer, kv_group) pairs.
    """
    chosen = top_share(induction_kv, induction_ratio) | top_share(echo_kv, echo_ratio)
    return frozenset((int(l), int(g)) for l, g in chosen.nonzero().tolist())


def retrieval_kv_heads(scores: HeadScores) -> frozenset[tuple[int, int]]:
    """The (layer, kv_group) retrieval heads recorded in an echo/induction result.

    Args:
        scores: an `echo_induction_scan` HeadScores (its "retrieval_kv" map).

    Returns:
        The set of (layer, kv_group) pairs.
    """
    return frozenset((int(l), int(g)) for l, g in (scores.maps["retrieval_kv"] > 0.5).nonzero().tolist())


def echo_induction_scan(model: HeadModel, params: RazorParams = RazorParams(), *, progress: bool = True) -> HeadScores:
    """Echo and induction scores of every head and KV head, and RazorAttention's retrieval KV heads.

    Maps: "echo", "induction" `[L, H]` (primary: induction); "echo_kv", "induction_kv" `[L, G]`;
    "retrieval_kv" `[L, G]` (1.0 for the selected heads). Items: the tokens and per-sequence maps `[B, L, H]`.

    Args:
        model: the HeadModel to scan.
        params: block length, repeats, batch, seed, the selection ratios and the head-statistics implementation.
        progress: show a progress bar.

    Returns:
        HeadScores (analysis "razor") with the maps and items above; `meta` holds how many KV heads were selected.
    """
    tokens = repeated_random(model, block=params.block, repeats=params.repeats, batch=params.batch, seed=params.seed)
    per_layer: dict[int, list[dict[str, torch.Tensor]]] = {l: [] for l in range(model.n_layers)}
    for row in tqdm(tokens.split(1), desc=f"echo/induction {model.name}", disable=not progress, leave=False):
        run = model.stats(row, impl=params.impl, statistics="lse",  # pair weights need only each row's lse
                          reducer=lambda record, stats: _layer_scores(record, stats, params.block, params.repeats))
        for layer, scores in run.extra.items():
            per_layer[layer].append(scores)
    items: dict[str, torch.Tensor] = {"tokens": tokens}
    for key in MAPS:  # [B, L, H]
        items[key] = torch.stack([torch.cat([d[key] for d in per_layer[l]]) for l in range(model.n_layers)], 1)
    maps = {key: items[key].mean(0) for key in MAPS}
    for key in MAPS:
        maps[f"{key}_kv"] = per_kv_head(maps[key], model.n_kv_heads)
    chosen = select_retrieval_kv(maps["echo_kv"], maps["induction_kv"], echo_ratio=params.echo_ratio,
                                 induction_ratio=params.induction_ratio)
    maps["retrieval_kv"] = torch.zeros_like(maps["echo_kv"])
    for layer, group in chosen:
        maps["retrieval_kv"][layer, group] = 1.0
    meta = run_meta(model, n_retrieval_kv=len(chosen), n_kv_heads_total=model.n_layers * model.n_kv_heads)
    return HeadScores(analysis="razor", model=model.name, maps=maps, primary="induction",
                      params=params_dict(params), meta=meta, items=items)


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A decoding condition of a needle trial: heads masked and/or a KV policy, active during decoding only.

    Attributes:
        name: its label (e.g. "baseline", "top10-uniform", "random10-uniform-0", "razor-w256").
        mask: heads to mask.
        how: how they are masked: "uniform" (attention made uniform over the cache) or "zero" (output zeroed).
        kv_policy: a RazorKV; its `compress_at` is set to each trial's prefill length.
        score: accumulate retrieval scores (the baseline).
        real_cache: decode with the policy as a real compressed cache (`RazorCache`, only the kept entries in
            memory) instead of the `RazorKV` edit over the full cache (the same outputs).
    """

    name: str
    mask: tuple[HeadRef, ...] = ()
    how: str = "uniform"
    kv_policy: RazorKV | None = None
    score: bool = False
    real_cache: bool = False

    @property
    def spec(self) -> str:
        """What the condition does, recorded with each trial (a rerun redoes trials whose spec changed)."""
        p = self.kv_policy
        policy = "" if p is None else (f"full={sorted(p.full)};sinks={p.sinks};window={p.window};"
                                       f"frac={p.window_frac};comp={p.compensation}")
        real = "|real" if self.real_cache and p is not None else ""  # specs of earlier runs stay as they were
        return f"{self.name}|{self.how}|{','.join(map(str, self.mask))}|{policy}{real}"

    def policy(self, prefill: int) -> RazorKV | None:
        """The KV policy compressing a cache of `prefill` tokens (None without a policy).

        Args:
            prefill: the prompt's length in the cache.

        Returns:
            `kv_policy` with `compress_at = prefill`, or None.
        """
        return None if self.kv_policy is None else dataclasses.replace(self.kv_policy, compress_at=prefill)

    def edits(self, prefill: int) -> list[Any]:
        """The scoped edits for a trial whose cache holds `prefill` tokens before decoding.

        Args:
            prefill: the prompt's length in the cache.

        Returns:
            Ablate edits of the masked heads, plus the KV policy unless it runs as a real cache.
        """
        policy = None if self.real_cache else self.policy(prefill)  # a real cache compresses itself
        return [Ablate(h, how=self.how) for h in self.mask] + ([policy] if policy is not None else [])


def masking_conditions(scores: HeadScores, ks: Iterable[int], *, draws: int = 3, how: str = "uniform",
                       exclude_top: float = 0.1, seed: int = 0) -> list[Condition]:
    """Mask the top-K retrieval heads; and K random heads, `draws` times, from outside the top heads.

    The random heads are drawn outside the top max(K, `exclude_top` × all) heads (the authors draw outside their
    top-100 list).

    Args:
        scores: retrieval scores (HeadScores).
        ks: the K values.
        draws: random draws per K.
        how: "uniform" or "zero" masking.
        exclude_top: the share of top heads random draws avoid.
        seed: the draws' seed.

    Returns:
        Conditions "top{K}-{how}" and "random{K}-{how}-{draw}".
    """
    ranked = [h for h, _ in scores.top(scores.scores.numel())]
    out = []
    for k in ks:
        out.append(Condition(name=f"top{k}-{how}", mask=tuple(ranked[:k]), how=how))
        pool = ranked[max(k, round(exclude_top * len(ranked))):]
        for d in range(draws):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * k + d)
            pick = torch.randperm(len(pool), generator=gen)[:k].tolist()
            out.append(Condition(name=f"random{k}-{how}-{d}", mask=tuple(sorted(pool[i] for i in pick)), how=how))
    return out


def razor_conditions(full: frozenset[tuple[int, int]], windows: Iterable[int], *, sinks: int = 4,
                     window_frac: float = 0.0, controls: bool = True, kv_cache: str = "simulated") -> list[Condition]:
    """RazorAttention at each window ("razor-w{W}", "-f{frac}" appended when window_frac > 0).

    Args:
        full: the retrieval KV heads kept full, as (layer, kv_group).
        windows: the recent-window lengths S0 (one condition each).
        sinks: N0, the first tokens every head keeps.
        window_frac: 1/C (the window grows with the context).
        controls: also the same policy on every head, none kept full ("window-w{W}...").
        kv_cache: "simulated" (the `RazorKV` edit over the full cache), "real" (a `RazorCache`; names end in
            "-real") or "both".

    Returns:
        The Conditions.

    Raises:
        PromptError: an unknown kv_cache.
    """
    if kv_cache not in ("simulated", "real", "both"):
        raise PromptError(f"kv_cache {kv_cache!r}: choose simulated, real or both")
    modes = {"simulated": (False,), "real": (True,), "both": (False, True)}[kv_cache]
    out = []
    for w in windows:
        policy = RazorKV(full=full, sinks=sinks, window=w, window_frac=window_frac)
        tail = f"w{w}" + (f"-f{window_frac:g}" if window_frac else "")
        for real in modes:
            end = "-real" if real else ""
            out.append(Condition(name=f"razor-{tail}{end}", kv_policy=policy, real_cache=real))
            if controls:
                out.append(Condition(name=f"window-{tail}{end}", kv_policy=dataclasses.replace(policy, full=frozenset()),
                                     real_cache=real))
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per condition: mean recall ("accuracy"), share of replies that count ("found"), mean KV fraction, count.

    Args:
        records: per-trial records (keys condition, recall, found, and kv for KV policies).

    Returns:
        {condition: {"accuracy", "found", "kv_fraction", "n"}}.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        rows.setdefault(rec["condition"], []).append(rec)
    return {name: {"accuracy": sum(r["recall"] for r in rs) / len(rs),
                   "found": sum(bool(r["found"]) for r in rs) / len(rs),
                   "kv_fraction": sum(r["kv"]["fraction"] if "kv" in r else 1.0 for r in rs) / len(rs),
                   "n": len(rs)} for name, rs in rows.items()}


@dataclass
class RetrievalReport:
    """What `retrieval_scan` found: retrieval and echo/induction scores, per-trial records, per-condition summary.

    Attributes:
        scores: retrieval scores (HeadScores, primary "retrieval").
        razor: the echo/induction scan that chose the retrieval KV heads.
        records: one dict per (trial, condition): reply, recall, found, span, seconds, KV kept.
        summary: `summarize(records)`.
        mask_how: the masking of the masking test.
    """

    scores: HeadScores
    razor: HeadScores
    records: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    mask_how: str = "uniform"

    def figures(self) -> dict[str, Any]:
        """Plotly figures: layer × head retrieval scores, baseline recall grid, masking test, recall vs KV kept.

        Returns:
            {"retrieval_heatmap", "needle_accuracy", "masking", "kv_accuracy"}: plotly Figures.
        """
        return {"retrieval_heatmap": self.scores.figure(), "needle_accuracy": accuracy_grid(self.records),
                "masking": masking_figure(self.summary, self.mask_how), "kv_accuracy": kv_figure(self.summary)}

    def save(self, folder: str | Path) -> Path:
        """Write the report into `folder`.

        razor/ (echo/induction), summary.json, records.json, the figures as HTML, then scores.json + items
        (retrieval) last: the commit marker `load` and reruns look for.

        Args:
            folder: the folder (created if needed).

        Returns:
            The folder, as a Path.
        """
        folder = Path(folder)
        self.razor.save(folder / "razor")
        write_json(folder / "summary.json", self.summary)
        write_json(folder / "records.json", {"mask_how": self.mask_how, "records": self.records})
        for name, fig in self.figures().items():
            fig.write_html(folder / f"{name}.html", include_plotlyjs="cdn")
        self.scores.save(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "RetrievalReport":
        """A report saved by `save`.

        Args:
            folder: the folder `save` wrote.

        Returns:
            The RetrievalReport.

        Raises:
            ResultError: a part missing or unreadable (the message names the file).
        """
        folder = Path(folder)
        scores = HeadScores.load(folder)
        saved = read_json(folder / "records.json")
        return cls(scores=scores, razor=HeadScores.load(folder / "razor"), records=saved["records"],
                   summary=read_json(folder / "summary.json"), mask_how=saved["mask_how"])
