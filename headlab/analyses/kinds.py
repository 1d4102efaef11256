"""Heads across attention kinds: how spiky, monotonic and low-rank softmax and linear-attention heads are.

Hedgehog (Zhang et al. 2024) traces linear attention's gap to softmax to two properties of softmax weights:
they are low-entropy ("spiky") and monotonic in the dot product q·k. RALA (Fan et al. 2025) traces it to rank:
a linear layer's output goes through a state of at most min(F, D) dimensions. `head_metrics` measures both
per head on any of headlab's models; for a linear head every measure reads the implicit pattern A, the matrix
the layer applies to v (`LayerRecord.pattern`; A @ v is the layer's output). The full T×T patterns are built (one
minibatch and layer at a time): meant for the short prompts of small models. For one head and one prompt of
T real tokens, over the real query rows i and the keys j that row may see (n_i of them):

- entropy: H_i = −Σ_j w_ij log w_ij with w_ij = |A_ij| / Σ_j |A_ij| (nats), averaged over rows with n_i ≥ 2;
  norm_entropy divides each row's H_i by log n_i first (0 = one key, 1 = uniform);
- monotonicity: the Spearman rank correlation between A_i· and the raw scores q_i·k_j (record.q, record.k,
  before any feature map), averaged over rows with n_i ≥ min_keys; 1 for a softmax head up to ties;
- pattern_rank: the effective rank of the T×T pattern, the fewest singular values that hold `energy` of
  Σ σ² (its squared Frobenius norm); pattern_rank_frac = pattern_rank / T;
- state_rank: the effective rank, by the same rule, of a linear layer's recurrent state after the last real
  token (`LinearMixer.state`, `[F, D]`), out of state_dim = min(F, D). NaN for softmax and sliding-window
  layers, which keep the KV cache instead of a fixed-size state;
- row_mass: Σ_j |A_ij| averaged over rows with n_i ≥ 2 (1 for the normalised kinds; the scale of GLA's and
  DeltaNet's rows, which the output projection absorbs);
- induction, prev_token: the repeated-random-tokens scan of `headlab.analyses.induction`: raw pattern entries,
  so for GLA and DeltaNet they are on the scale of row_mass, not shares;
- induction_share, prev_token_share: the same (query, key) pairs on the scan's own `[BOS] r r` sequences, read
  as shares |A_ij| / Σ_j |A_ij| of the row (equal to the scan's scores for the normalised kinds), comparable
  across every kind; induction_top1, prev_token_top1: how often that key is the row's largest |A_ij| (a head can
  find the right key while spreading most of its mass, as DeltaNet's do).

The normalised kinds (softmax, swa, linear, hedgehog, based) have non-negative rows summing to 1, so the
entropy is the plain row entropy. GLA's and DeltaNet's patterns are unnormalised and DeltaNet's is signed:
their entropy is that of |A| renormalised per row, a shape measure that ignores the rows' scale and sign.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from headlab.analyses.induction import InductionParams, induction_scan
from headlab.analyses.metrics import (  # noqa: F401  (re-exported)
    effective_rank, rank_of_spectrum, row_entropy, row_spearman)
from headlab.capture import LayerRecord
from headlab.errors import PromptError, UnsupportedModelError
from headlab.heads import HeadRef
from headlab.models.head_model import HeadModel, Prompt
from headlab.results import HeadScores, params_dict, read_json, run_meta, write_json
from headlab.run import Batch

#: Metrics measured on the prompts (per prompt in `items`), then those of the `[BOS] r r` sequences.
PROMPT_METRICS = ("entropy", "norm_entropy", "monotonicity", "pattern_rank", "pattern_rank_frac", "state_rank",
                  "state_dim", "row_mass")
METRICS = (*PROMPT_METRICS, "induction", "prev_token", "induction_share", "prev_token_share", "induction_top1",
           "prev_token_top1")
COMPARISON_FILE = "comparison.json"


@dataclass(frozen=True, kw_only=True)
class KindParams:
    """Settings of the per-kind head metrics.

    Attributes:
        source: where prompts come from when none are given: "recall" (`[BOS] r r …` of period `period`,
            token ids 0..127 with BOS 0, the recall twins' evaluation data) or "text" (held-out KJV byte
            windows after BOS 256, the text twins' evaluation data).
        n_prompts: how many prompts to draw.
        seq_len: tokens per drawn prompt, BOS included (must fit the model's context).
        period: the recall period.
        seed: seed of the prompt draw and of the induction scan's tokens.
        min_keys: rows that see fewer keys are left out of monotonicity (a rank correlation over 2 keys is ±1).
        energy: share of Σ σ² that the effective ranks must hold.
        induction_seq_len: N of the induction scan's `[BOS] r r` (1 + 2N tokens).
        induction_batch: sequences of the induction scan.
        minibatch: prompts per forward.
    """

    source: Literal["recall", "text"] = "recall"
    n_prompts: int = 16
    seq_len: int = 64
    period: int = 16
    seed: int = 0
    min_keys: int = 4
    energy: float = 0.99
    induction_seq_len: int = 24
    induction_batch: int = 16
    minibatch: int = 8

    def __post_init__(self) -> None:
        if self.source not in ("recall", "text"):
            raise ValueError(f"KindParams.source must be 'recall' or 'text', got {self.source!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"KindParams.energy must lie in (0, 1], got {self.energy}")
        if self.n_prompts < 1 or self.seq_len < 2 or self.minibatch < 1:
            raise ValueError(f"KindParams needs n_prompts >= 1, seq_len >= 2 and minibatch >= 1; got "
                             f"n_prompts={self.n_prompts}, seq_len={self.seq_len}, minibatch={self.minibatch}")
        if self.min_keys < 2:
            raise ValueError(f"KindParams.min_keys must be >= 2 (a rank correlation needs two keys), got "
                             f"{self.min_keys}")


def kind_prompts(params: KindParams = KindParams()) -> torch.Tensor:
    """The prompts `[n_prompts, seq_len]` that `params.source` names (the twins' own evaluation data)."""
    from headlab.models.linear.train import TEXT_HELDOUT, recall_eval_batch, text_bytes, text_eval_windows

    if params.source == "recall":
        ids, _ = recall_eval_batch(params.n_prompts, params.period, seed=params.seed, seq_len=params.seq_len - 1)
        return ids
    windows = text_eval_windows(text_bytes(TEXT_HELDOUT), params.seq_len)
    if len(windows) < params.n_prompts:
        raise PromptError(f"the held-out text has {len(windows)} windows of {params.seq_len} tokens; asked for "
                          f"{params.n_prompts}")
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(params.seed))[:params.n_prompts]
    return windows[pick.sort().values]


def check_model(model: HeadModel, params: KindParams, prompts: Prompt | None = None) -> None:
    """Raise a clear error if `model` cannot be measured with these settings (before anything runs)."""
    if not isinstance(model, HeadModel):
        raise UnsupportedModelError(f"expected a HeadModel (headlab.load(...)), got {type(model).__name__}")
    if not (model.causal and model.is_lm):
        raise UnsupportedModelError(f"{model.name} ({type(model.hf).__name__}) is not a causal LM: the per-kind "
                                    "metrics compare causal heads (and the induction scan needs next-token targets)")
    ctx = model.max_context
    if ctx is None:
        return
    if prompts is None and params.seq_len > ctx:
        raise PromptError(f"KindParams.seq_len={params.seq_len} is longer than {model.name}'s context of {ctx} tokens")
    if 1 + 2 * params.induction_seq_len > ctx:
        raise PromptError(f"KindParams.induction_seq_len={params.induction_seq_len} gives 1 + 2×"
                          f"{params.induction_seq_len} = {1 + 2 * params.induction_seq_len} tokens, longer than "
                          f"{model.name}'s context of {ctx} tokens")
    if prompts is not None:
        model.encode(prompts)  # raises PromptError naming the length and the context


def _state_dims(records: dict[int, LayerRecord]) -> dict[int, int]:
    """min(F, D) of each linear layer's state."""
    return {layer: min(r.mixer.fk.shape[-1], r.v.shape[-1]) for layer, r in records.items() if r.linear}


def head_metrics(model: HeadModel, prompts: Prompt | None = None, params: KindParams = KindParams(), *,
                 progress: bool = True) -> HeadScores:
    """Entropy, monotonicity, pattern and state rank, induction and previous-token scores of every head.

    Args:
        model: a causal-LM HeadModel (softmax, linear-attention or hybrid).
        prompts: anything `HeadModel.encode` reads (token ids, texts, a Batch); None draws `params.source`'s.
        params: the prompt source and size, the rank energy, the induction scan's size (`KindParams`).
        progress: show a progress bar.

    Returns:
        HeadScores (analysis "kinds", primary map "norm_entropy") with maps `[L, H]`: entropy, norm_entropy,
        monotonicity, pattern_rank, pattern_rank_frac, state_rank, state_dim (NaN for softmax/swa layers),
        row_mass, induction, prev_token, first_token, induction_share, prev_token_share, induction_top1,
        prev_token_top1. Items: per-prompt maps
        `[N, L, H]` of the first eight (PROMPT_METRICS); per-row
        `row_entropy`, `row_monotonicity` `[N, L, H, T]` (NaN where a row is left out); `pattern_spectrum`
        `[N, L, H, T]` (singular values of each pattern, NaN-padded); `tokens` `[N, T]`; `lengths` `[N]`;
        and per scan sequence `scan_induction`, `scan_prev_token`, `scan_induction_share`, `scan_prev_token_share`,
        `scan_induction_top1`, `scan_prev_token_top1` `[B, L, H]` with the `scan_tokens`. Meta: layer_kinds, the
        induction scan's copy losses.

    Raises:
        UnsupportedModelError: not a HeadModel, or not a causal LM.
        PromptError: prompts (or the induction scan's sequences) longer than the model's context, or bad prompts.
    """
    check_model(model, params, prompts)
    start = time.perf_counter()
    batch = model.encode(kind_prompts(params) if prompts is None else prompts)
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    n, t = ids.shape
    n_l, n_h = model.n_layers, model.n_heads
    nan = float("nan")
    per = {key: torch.full((n, n_l, n_h), nan) for key in PROMPT_METRICS}
    rows_h = torch.full((n, n_l, n_h, t), nan)
    rows_m = torch.full((n, n_l, n_h, t), nan)
    spectrum = torch.full((n, n_l, n_h, t), nan)
    lengths = mask.sum(-1)
    for i0 in tqdm(range(0, n, params.minibatch), desc=f"kind metrics {model.name}", disable=not progress,
                   leave=False):
        i1 = min(n, i0 + params.minibatch)
        sub = Batch(ids[i0:i1], mask[i0:i1]).to(model.device)
        run = model.run(sub)
        dims = _state_dims(run.records)
        for layer, record in run.records.items():
            p = record.pattern().float().cpu()  # [b, H, T, T]
            real = mask[i0:i1].bool()
            vis = record.visible().cpu().expand(len(p), 1, t, t) & real[:, None, None, :] & real[:, None, :, None]
            n_vis = vis.sum(-1)  # [b, 1, T]
            h = row_entropy(p, vis)  # [b, H, T]
            h = torch.where(n_vis >= 2, h, nan)
            mass = (p.abs() * vis).sum(-1)  # [b, H, T]
            per["row_mass"][i0:i1, layer] = torch.where(n_vis >= 2, mass, nan).nanmean(-1)
            rows_h[i0:i1, layer] = h
            per["entropy"][i0:i1, layer] = h.nanmean(-1)
            per["norm_entropy"][i0:i1, layer] = (h / n_vis.clamp_min(2).float().log()).nanmean(-1)
            scores = torch.matmul(record.q.float(), record.k.float().repeat_interleave(
                record.q.shape[1] // record.k.shape[1], dim=1).transpose(-1, -2)).cpu()  # [b, H, T, T]
            m = torch.where(n_vis >= params.min_keys, row_spearman(p, scores, vis), nan)
            rows_m[i0:i1, layer] = m
            per["monotonicity"][i0:i1, layer] = m.nanmean(-1)
            for b in range(len(p)):
                length = int(lengths[i0 + b])
                sv = torch.linalg.svdvals(p[b, :, :length, :length].double())  # [H, length]
                spectrum[i0 + b, layer, :, :length] = sv.float()
                rank = rank_of_spectrum(sv, params.energy)
                per["pattern_rank"][i0 + b, layer] = rank
                per["pattern_rank_frac"][i0 + b, layer] = rank / length
                if record.linear:
                    state = final_state(record, b, length)  # [H, F, D]
                    per["state_rank"][i0 + b, layer] = effective_rank(state, params.energy)
                    per["state_dim"][i0 + b, layer] = float(dims[layer])
    maps = {key: per[key].nanmean(0) for key in per}

    scan = induction_scan(model, InductionParams(seq_len=params.induction_seq_len, batch=params.induction_batch,
                                                 seed=params.seed, minibatch=params.minibatch), progress=False)
    for key in ("induction", "prev_token", "first_token"):
        maps[key] = scan.maps[key].float()
    shares = pair_shares(model, scan.items["tokens"], params.induction_seq_len, minibatch=params.minibatch)
    maps.update({key: value.mean(0) for key, value in shares.items()})
    items = {**per, "row_entropy": rows_h, "row_monotonicity": rows_m, "pattern_spectrum": spectrum,
             "tokens": ids, "lengths": lengths,
             "scan_induction": scan.items["induction"], "scan_prev_token": scan.items["prev_token"],
             "scan_tokens": scan.items["tokens"], **{f"scan_{key}": value for key, value in shares.items()}}
    meta = run_meta(model, seconds=round(time.perf_counter() - start, 2), layer_kinds=list(model.layer_kinds),
                    n_prompts=n, prompt_lengths=lengths.tolist(), prompts_given=prompts is not None,
                    **{k: v for k, v in scan.meta.items() if k.startswith("loss_")})
    return HeadScores(analysis="kinds", model=model.name, maps=maps, primary="norm_entropy",
                      params=params_dict(params), meta=meta, items=items)


def pair_shares(model: HeadModel, tokens: torch.Tensor, seq_len: int, *, minibatch: int = 8) -> dict[str, torch.Tensor]:
    """Per sequence of `[BOS] r r` (|r| = seq_len): for the induction pairs (i, i − N + 1), i = N+1..2N, and the
    previous-token pairs (i, i − 1), i = 2..2N (those of `headlab.analyses.induction`), the mean share
    |A_ij| / Σ_j |A_ij| (`*_share`) and how often j is the row's largest |A_ij| (`*_top1`); `[B, L, H]` each."""
    n = seq_len
    pairs = {"induction": (torch.arange(n + 1, 2 * n + 1), n - 1), "prev_token": (torch.arange(2, 2 * n + 1), 1)}
    keys = [f"{name}_{what}" for name in pairs for what in ("share", "top1")]
    out: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for chunk in tokens.split(minibatch):
        run = model.run(chunk)
        per_layer: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        for layer in range(model.n_layers):
            record = run.records[layer]
            mag = record.pattern().float().abs().cpu() * record.visible().cpu()  # [b, H, T, T]
            for name, (rows, back) in pairs.items():
                sub = mag[:, :, rows]  # [b, H, P, T]
                idx = (rows - back).view(1, 1, -1, 1).expand(*sub.shape[:3], 1)
                target = sub.gather(-1, idx)[..., 0]  # [b, H, P]
                per_layer[f"{name}_share"].append((target / sub.sum(-1).clamp_min(1e-30)).mean(-1))
                per_layer[f"{name}_top1"].append((sub.argmax(-1, keepdim=True) == idx)[..., 0].float().mean(-1))
        for key in keys:
            out[key].append(torch.stack(per_layer[key], 1))  # [b, L, H]
    return {key: torch.cat(value) for key, value in out.items()}


def final_state(record: LayerRecord, index: int, length: int) -> torch.Tensor:
    """A linear layer's recurrent state `[H, F, D]` after the first `length` tokens of batch item `index` (the
    padding is cut off first: GLA would keep decaying over padded positions)."""
    mixer = record.mixer
    if mixer is None:
        raise ValueError(f"layer {record.layer} is a softmax layer: it keeps a KV cache, not a recurrent state")

    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[index:index + 1, :, :length]

    short = dataclasses.replace(mixer, fq=cut(mixer.fq), fk=cut(mixer.fk), g=cut(mixer.g), beta=cut(mixer.beta))
    group = record.q.shape[1] // record.v.shape[1]
    v = record.v[index:index + 1, :, :length].repeat_interleave(group, dim=1)
    return short.state(v)[0].cpu()


def pattern_identity_error(model: HeadModel, prompts: Prompt) -> dict[int, float]:
    """Per layer, max |A @ v − z| over real positions, relative to max |z|: how exactly the (implicit) pattern
    reproduces the layer's per-head output (float32 rounding, ~1e-6, when it does)."""
    run = model.run(prompts, with_z=True)
    real = run.batch.attention_mask.bool()
    out = {}
    for layer, rec in sorted(run.records.items()):
        group = rec.q.shape[1] // rec.v.shape[1]
        mixed = torch.matmul(rec.pattern(), rec.v.float().repeat_interleave(group, dim=1)).transpose(1, 2)
        z = rec.z.float()
        out[layer] = float((mixed - z)[real].abs().max() / z[real].abs().max().clamp_min(1e-30))
    return out


def head_patterns(models: dict[str, HeadModel], prompt: Prompt, heads: dict[str, HeadRef]) -> dict[str, torch.Tensor]:
    """One head's pattern `[T, T]` per model on the same prompt (its first batch item, real tokens only)."""
    out = {}
    for key, model in models.items():
        run = model.run(prompt, heads=[heads[key]])
        length = int(run.batch.attention_mask[0].sum())
        out[key] = run.pattern(heads[key])[0, :length, :length].cpu()
    return out


def markdown_table(rows: Sequence[dict[str, Any]], *, digits: int = 3) -> str:
    """Rows of dicts (the keys of the first row are the columns) as a Markdown table; NaN shows as "–"."""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "–" if math.isnan(x) else f"{x:.{digits}f}"
        return str(x)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class KindComparison:
    """`head_metrics` of several models on the same prompts.

    Attributes:
        scores: per model key, its HeadScores (analysis "kinds").
        layer_kinds: per model key, each layer's kind.
        params: the KindParams used (as a dict).
    """

    scores: dict[str, HeadScores]
    layer_kinds: dict[str, list[str]]
    params: dict[str, Any]

    @property
    def models(self) -> list[str]:
        """The model keys, in the order they were compared."""
        return list(self.scores)

    def table(self) -> list[dict[str, Any]]:
        """One row per head: model, layer, head, kind and every metric (NaN where undefined).

        Returns:
            A list of dicts, models in order, then layers, then heads.
        """
        rows = []
        for key, sc in self.scores.items():
            n_l, n_h = sc.maps[METRICS[0]].shape
            for layer in range(n_l):
                for head in range(n_h):
                    row = {"model": key, "layer": layer, "head": head, "kind": self.layer_kinds[key][layer]}
                    row.update({m: float(sc.maps[m][layer, head]) for m in METRICS})
                    rows.append(row)
        return rows

    def summary(self) -> list[dict[str, Any]]:
        """Means of every metric over heads, per model and layer kind.

        Returns:
            One dict per model (kind "all") and, for hybrid models, per model and layer kind: the heads counted,
            each metric's NaN-skipping mean, and the best head's induction share (`induction_share_max`,
            comparable across kinds).
        """
        rows = []
        table = self.table()
        for key in self.scores:
            kinds = list(dict.fromkeys(self.layer_kinds[key]))
            groups = [("all", [r for r in table if r["model"] == key])]
            if len(kinds) > 1:
                groups += [(k, [r for r in table if r["model"] == key and r["kind"] == k]) for k in kinds]
            for kind, sel in groups:
                row = {"model": key, "kind": kind, "heads": len(sel)}
                for m in METRICS:
                    vals = [r[m] for r in sel if not math.isnan(r[m])]
                    row[m] = sum(vals) / len(vals) if vals else float("nan")
                row["induction_share_max"] = max(r["induction_share"] for r in sel)
                rows.append(row)
        return rows

    def to_markdown(self, metrics: Sequence[str] | None = None, *, per_head: bool = False, digits: int = 3) -> str:
        """The summary (or, with per_head, the full table) as a Markdown table, of some metrics (all when None).

        Args:
            metrics: the metric columns to keep (None: all of `METRICS`).
            per_head: one row per head (`table`) instead of the per-model summary.
            digits: significant digits of the numbers.

        Returns:
            The Markdown table as a string.

        Raises:
            KeyError: an unknown metric.
        """
        rows = self.table() if per_head else self.summary()
        if metrics is not None:
            unknown = [m for m in metrics if m not in rows[0]]
            if unknown:
                raise KeyError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
            lead = ["model", "layer", "head", "kind"] if per_head else ["model", "kind", "heads"]
            rows = [{k: r[k] for k in [*lead, *metrics]} for r in rows]
        return markdown_table(rows, digits=digits)

    def figure(self, metric: str = "norm_entropy"):
        """Per-head values of a metric, one column per model, coloured by layer kind (plotly).

        Args:
            metric: one of `METRICS`.

        Returns:
            A plotly Figure (`headlab.viz.kinds.metric_by_model`).
        """
        from headlab.viz.kinds import metric_by_model

        return metric_by_model(self.table(), metric)

    def save(self, folder: str | Path) -> Path:
        """Each model's HeadScores in `folder/<i>-<key>/` and `comparison.json` (keys, folders, kinds, params).

        Args:
            folder: the folder to write (created if needed).

        Returns:
            The folder, as a Path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dirs = {}
        for i, (key, sc) in enumerate(self.scores.items()):
            dirs[key] = f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}"
            sc.save(folder / dirs[key])
        write_json(folder / COMPARISON_FILE,
                   {"models": list(self.scores), "folders": dirs, "layer_kinds": self.layer_kinds, "params": self.params})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "KindComparison":
        """Read a comparison written by `save`.

        Args:
            folder: the folder holding `comparison.json` and one HeadScores folder per model.

        Returns:
            The KindComparison.

        Raises:
            FileNotFoundError: no `comparison.json` in the folder.
        """
        folder = Path(folder)
        path = folder / COMPARISON_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no {COMPARISON_FILE}: not a saved KindComparison")
        data = read_json(path)
        scores = {key: HeadScores.load(folder / data["folders"][key]) for key in data["models"]}
        return cls(scores=scores, layer_kinds={k: list(v) for k, v in data["layer_kinds"].items()},
                   params=data["params"])


@dataclass(frozen=True)
class KindsWorker:
    """Scans one model in a worker process: `(key, name or folder)` → (its `head_metrics`, its layer kinds)."""

    prompts: Any
    params: KindParams

    def __call__(self, job: tuple[str, str]) -> tuple[HeadScores, list[str]]:
        """Load the model named `job[1]` and return its HeadScores and layer kinds."""
        from headlab.models import load

        key, source = job
        model = load(source)
        try:
            check_model(model, self.params, self.prompts)
        except (UnsupportedModelError, PromptError) as err:
            raise type(err)(f"model {key!r}: {err}") from err
        return head_metrics(model, self.prompts, self.params, progress=False), list(model.layer_kinds)


def compare_kinds(models: dict[str, HeadModel | str], params: KindParams = KindParams(), *,
                  prompts: Prompt | None = None, progress: bool = True, executor: Any = None) -> KindComparison:
    """`head_metrics` of every model on the same prompts (drawn once from `params.source` when none are given).

    Args:
        models: {key: HeadModel}, e.g. {"softmax": hl.load(...), "gla": hl.load(...)}; with a non-local executor,
            {key: bundled name or folder} (each worker process loads its model).
        params: the settings shared by every model (`KindParams`).
        prompts: the prompts (None: drawn from `params.source`).
        progress: show progress bars.
        executor: where the models are scanned (`headlab.executors`; None: here, one after another); a Ray
            executor scans one model per unit, results gathered here as they finish.

    Returns:
        A KindComparison: each model's HeadScores and layer kinds, and the params.

    Raises:
        ValueError: `models` is not a non-empty dict.
        UnsupportedModelError: a model that is not a causal-LM HeadModel (the message names its key).
        PromptError: prompts that do not fit a model (the message names its key).
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("compare_kinds needs a non-empty dict {name: HeadModel}, e.g. {'softmax': hl.load(...), "
                         f"'gla': hl.load(...)}}; got {models!r}")
    if executor is not None and executor.name != "local":
        if not all(isinstance(m, (str, Path)) for m in models.values()):
            raise ValueError("with a non-local executor, give each model as its bundled name or folder: the workers "
                             "load them")
        shared = kind_prompts(params) if prompts is None else prompts
        got: dict[str, tuple[HeadScores, list[str]]] = {}
        bar = tqdm(total=len(models), desc="kinds", disable=not progress)

        def done(job: tuple[str, str], result: tuple[HeadScores, list[str]]) -> None:
            got[job[0]] = result
            bar.update(1)
        executor.run(lambda: KindsWorker(shared, params), [(k, str(v)) for k, v in models.items()], done)
        bar.close()
        return KindComparison(scores={k: got[k][0] for k in models}, layer_kinds={k: got[k][1] for k in models},
                              params=params_dict(params))
    from headlab.models import load as _load

    models = {k: (_load(str(m)) if isinstance(m, (str, Path)) else m) for k, m in models.items()}
    for key, model in models.items():
        try:
            check_model(model, params, prompts)
        except (UnsupportedModelError, PromptError) as err:
            raise type(err)(f"model {key!r}: {err}") from err
    shared = kind_prompts(params) if prompts is None else prompts
    scores = {}
    for key, model in tqdm(models.items(), desc="kinds", disable=not progress):
        scores[key] = head_metrics(model, shared, params, progress=progress)
    return KindComparison(scores=scores, layer_kinds={k: list(m.layer_kinds) for k, m in models.items()},
                          params=params_dict(params))


def comparison_models(folder: str | Path, task: str, kinds: Sequence[str], *,
                      device: str = "cpu") -> dict[str, HeadModel]:
    """Load the trained twins `folder/<task>-<kind>/` that exist, keyed by kind (missing ones are left out)."""
    from headlab.models import load

    folder = Path(folder)
    return {kind: load(folder / f"{task}-{kind}", device=device) for kind in kinds
            if (folder / f"{task}-{kind}" / "config.json").is_file()}
