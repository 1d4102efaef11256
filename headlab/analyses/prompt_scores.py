"""Per-head scores of one given prompt: previous-token, induction-like, first-token sink, entropy.

Unlike `induction_scan` (which builds its own repeated random tokens), these read the
pattern A (rows = queries, columns = keys) that each head puts on the prompt at hand:
- prev_token: mean of A[i, i-1] over queries i = 2 .. T-1 (i = 1 .. T-1 when T = 2; row 1
  is left out otherwise because its previous token is also the first token);
- induction: for each query i whose token occurred earlier at some j < i, the attention
  mass on the positions j+1 that followed those earlier occurrences, averaged over such
  queries; NaN when no token of the prompt repeats;
- first_token: mean of A[i, 0] over queries i = 1 .. T-1 (the sink);
- entropy: mean over queries of the row entropy -Σ_s A[i, s] log A[i, s], in nats (of |A| rows normalised, as
  analyses.metrics.row_entropy: the same for softmax heads, defined for signed linear-attention patterns).
Patterns are computed per layer from q and k and discarded after reduction, so memory is
one layer's `[H, T, T]` pattern at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headlab.analyses.metrics import row_entropy
from headlab.capture import LayerRecord
from headlab.losses import next_token_losses
from headlab.errors import PromptError
from headlab.models.head_model import HeadModel, Prompt
from headlab.results import HeadScores, params_dict, run_meta

MAPS = ("prev_token", "induction", "first_token", "entropy")


@dataclass(frozen=True, kw_only=True)
class PromptScoreParams:
    """Settings of the prompt-level scores.

    Attributes:
        prepend_bos: prepend the model's BOS token when the prompt does not start with it.
    """

    prepend_bos: bool = False


def induction_targets(ids: torch.Tensor) -> torch.Tensor:
    """Bool `[T, T]`: M[i, s] is True when s = j+1 for an earlier occurrence j < i of token ids[i]."""
    ids = ids.flatten()
    t = ids.shape[0]
    same = (ids[:, None] == ids[None, :]) & torch.ones(t, t, dtype=torch.bool, device=ids.device).tril(-1)
    targets = torch.zeros(t, t, dtype=torch.bool, device=ids.device)
    targets[:, 1:] = same[:, :-1]
    return targets


def pattern_scores(pattern: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores `[H]` of a one-sequence pattern.

    Args:
        pattern: `[H, T, T]` attention weights (rows sum to 1 over visible keys).
        ids: `[T]` token ids of the sequence.
    """
    n_heads, t, _ = pattern.shape
    nan = torch.full((n_heads,), math.nan)
    pos = torch.arange(2 if t > 2 else 1, t)
    prev = pattern[:, pos, pos - 1].mean(-1) if t > 1 else nan
    first = pattern[:, 1:, 0].mean(-1) if t > 1 else nan
    targets = induction_targets(ids.to(pattern.device))
    rows = targets.any(-1)
    if bool(rows.any()):  # gather the few target entries instead of masking the whole [H, T, T]
        qi, si = targets.nonzero(as_tuple=True)
        mass = torch.zeros(n_heads, t, device=pattern.device).index_add_(1, qi, pattern[:, qi, si])
        induction = mass[:, rows].mean(-1)
    else:
        induction = nan
    # of |weights| normalised per row, as analyses.kinds: the plain entropy for softmax rows, defined for signed ones
    entropy = row_entropy(pattern, torch.ones_like(pattern, dtype=torch.bool)).nanmean(-1)
    return {"prev_token": prev.cpu(), "induction": induction.cpu(), "first_token": first.cpu(),
            "entropy": entropy.cpu()}


def prompt_scores(model: HeadModel, prompt: Prompt, params: PromptScoreParams = PromptScoreParams(), *,
                  records: dict[int, LayerRecord] | None = None) -> HeadScores:
    """Scores of every head on one prompt (primary map: induction), from a single forward.

    Args:
        records: when given, filled with each layer's LayerRecord (q, k, v), so that patterns can be
            shown later without another forward; otherwise each is dropped once reduced.

    Items: `tokens` `[T]` and, for causal LMs, from the same forward (so a caller needs no
    second run for predictions or the loss): `next_logits` `[V]` at the last position and
    `token_losses` `[T-1]` (position t predicting token t+1).
    """
    batch = model.encode(prompt, prepend_bos=params.prepend_bos)
    if batch.input_ids.shape[0] != 1:
        raise PromptError(f"prompt_scores reads one prompt; got a batch of {batch.input_ids.shape[0]}")
    ids = batch.input_ids[0]
    per_layer: dict[int, dict[str, torch.Tensor]] = {}

    def reduce(record: LayerRecord) -> None:
        per_layer[record.layer] = pattern_scores(record.pattern()[0], ids)
        if records is not None:
            records[record.layer] = record

    with model.capturing(keep=False, callback=reduce):
        out = model.forward(batch)
    maps = {key: torch.stack([per_layer[l][key] for l in range(model.n_layers)]) for key in MAPS}
    items = {"tokens": ids.cpu()}
    logits = getattr(out, "logits", None)
    if logits is not None and model.is_lm:  # not the whole [T, V]: 400 MB for SmolLM2 at 2048 tokens
        logits = logits[0].float()
        items["next_logits"] = logits[-1].cpu()
        items["token_losses"] = next_token_losses(logits, ids).cpu()
    return HeadScores(analysis="prompt_scores", model=model.name, maps=maps, primary="induction",
                      params=params_dict(params), meta=run_meta(model, n_tokens=int(ids.shape[0])), items=items)
