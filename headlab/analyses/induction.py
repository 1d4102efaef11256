"""Previous-token, induction and first-token (sink) scores on repeated random tokens.

Each sequence is `[BOS] r r` with `r` a block of N random non-special tokens. For a
head with pattern A (rows = queries, columns = keys; position 0 is BOS):
- previous-token: mean of A[i, i-1] over queries i = 2 .. 2N;
- induction: mean of A[i, i-N+1] over the second copy i = N+1 .. 2N (the token after
  the earlier occurrence of the current token);
- first-token: mean of A[i, 0] over queries i = 1 .. 2N.
Nothing of size T×T is built: each layer's row log-sum-exp comes with its output from the fused CPU
attention kernel (`HeadModel.stats(statistics="lse")`; the streaming head-statistics kernel elsewhere),
and the three scores are exact weights of chosen (query, key) pairs (`headlab.stats.pair_weights`). The scan therefore runs
at contexts where the full patterns would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from headlab.capture import LayerRecord
from headlab.errors import PromptError
from headlab.losses import next_token_losses
from headlab.models.head_model import HeadModel
from headlab.results import HeadScores, params_dict, run_meta
from headlab.stats import pair_weights
from headlab_kernels.head_stats import HeadStats
from headlab.inputs import repeated_blocks

MAPS = ("induction", "prev_token", "first_token")


@dataclass(frozen=True, kw_only=True)
class InductionParams:
    """Settings of the repeated-random-tokens scan.

    Attributes:
        seq_len: N, the length of the random block (the sequence is 1 + 2N tokens).
        batch: number of random sequences.
        seed: seed of the token sampler.
        minibatch: sequences per forward.
        impl: head-statistics implementation ("auto": Triton on CUDA, the torch reference elsewhere).
    """

    seq_len: int = 50
    batch: int = 16
    seed: int = 0
    minibatch: int = 8
    impl: str = "auto"


def content_token_ids(model: HeadModel) -> torch.Tensor:
    """Token ids that are not special tokens (the pool random sequences are drawn from)."""
    special = {model.bos_id, model.pad_id, getattr(model.hf.config, "eos_token_id", None)}
    if model.tokenizer is not None:
        special |= set(getattr(model.tokenizer, "all_special_ids", []))
    keep = torch.ones(model.vocab_size, dtype=torch.bool)
    for tok in special:
        for t in (tok if isinstance(tok, list) else [tok]):
            if isinstance(t, int) and 0 <= t < model.vocab_size:
                keep[t] = False
    return keep.nonzero().flatten()


def repeated_tokens(model: HeadModel, *, seq_len: int, batch: int, seed: int = 0) -> torch.Tensor:
    """`[batch, 1 + 2*seq_len]` token ids: BOS, then a random block, then the same block again.

    Args:
        model: the model whose vocabulary (content tokens, no special ones) and BOS (else pad) id to use.
        seq_len: N, the length of the random block.
        batch: number of sequences.
        seed: seed of the token sampler.

    Returns:
        A LongTensor `[batch, 1 + 2N]`.

    Raises:
        PromptError: seq_len < 2, batch < 1, or 1 + 2N tokens longer than the model's context.
    """
    if seq_len < 2 or batch < 1:
        raise PromptError(f"repeated tokens need seq_len >= 2 and batch >= 1, got seq_len={seq_len}, batch={batch}")
    total = 1 + 2 * seq_len
    if model.max_context is not None and total > model.max_context:
        raise PromptError(f"1 + 2×{seq_len} = {total} tokens exceed {model.name}'s context of {model.max_context}")
    bos = model.bos_id if model.bos_id is not None else model.pad_id
    return repeated_blocks(content_token_ids(model), batch=batch, block=seq_len, repeats=2, bos=bos,
                           generator=torch.Generator().manual_seed(seed))


def _reduce(record: LayerRecord, stats: HeadStats, seq_len: int) -> dict[str, torch.Tensor]:
    """Per-sequence scores `[B, H]` of one layer, from exact pair weights."""
    n, dev = seq_len, record.q.device
    pos = torch.arange(2, 2 * n + 1, device=dev)
    second = torch.arange(n + 1, 2 * n + 1, device=dev)
    rows = torch.arange(1, 2 * n + 1, device=dev)
    return {
        "induction": pair_weights(record, stats.lse, second, second - n + 1).mean(-1).cpu(),
        "prev_token": pair_weights(record, stats.lse, pos, pos - 1).mean(-1).cpu(),
        "first_token": pair_weights(record, stats.lse, rows, torch.zeros_like(rows)).mean(-1).cpu(),
    }


def induction_scan(model: HeadModel, params: InductionParams = InductionParams(), *,
                   progress: bool = True) -> HeadScores:
    """Previous-token, induction and first-token scores of every head (primary map: induction).

    Items: per-sequence maps `[B, L, H]`, the tokens `[B, 1+2N]`, and per-position losses
    `[B, 2N]` for causal LMs (position t predicts token t+1).

    Args:
        model: the HeadModel to scan.
        params: the sequence length, batch, seed, minibatch and head-statistics implementation.
        progress: show a progress bar.

    Returns:
        HeadScores with maps "prev_token", "induction", "first_token" `[L, H]` (means over sequences), the items
        above, and the first/second-copy losses in `meta` for causal LMs.

    Raises:
        PromptError: seq_len < 2, batch < 1, or 1 + 2N tokens longer than the model's context.
    """
    tokens = repeated_tokens(model, seq_len=params.seq_len, batch=params.batch, seed=params.seed)
    per_layer: dict[int, list[dict[str, torch.Tensor]]] = {l: [] for l in range(model.n_layers)}
    losses = []
    chunks = list(tokens.split(params.minibatch))
    for chunk in tqdm(chunks, desc=f"induction scan {model.name}", disable=not progress, leave=False):
        # only the row lse is needed: it rides on the attention call itself where the fused CPU kernel applies
        run = model.stats(chunk, impl=params.impl, statistics="lse",
                          reducer=lambda record, stats: _reduce(record, stats, params.seq_len))
        for layer, scores in run.extra.items():
            per_layer[layer].append(scores)
        if model.is_lm:
            losses.append(next_token_losses(run.output.logits, run.batch.input_ids).cpu())

    items: dict[str, torch.Tensor] = {"tokens": tokens}
    for key in MAPS:
        # [B, L, H]
        items[key] = torch.stack([torch.cat([d[key] for d in per_layer[l]]) for l in range(model.n_layers)], 1)
    maps = {key: items[key].mean(0) for key in MAPS}
    extra = {}
    if losses:
        items["token_losses"] = torch.cat(losses)
        extra = copy_losses(items["token_losses"], params.seq_len)
    return HeadScores(analysis="induction", model=model.name, maps=maps, primary="induction",
                      params=params_dict(params), meta=run_meta(model, **extra), items=items)


def copy_losses(token_losses: torch.Tensor, seq_len: int) -> dict[str, float]:
    """Mean loss on the first and second copy of `[BOS] r r`, from per-position losses `[B, 2N]`.

    The first token of each copy is left out (nothing predicts it): first copy = targets 2..N,
    second copy = targets N+2..2N.

    Args:
        token_losses: per-position next-token losses `[B, 2N]` (position t predicts token t+1).
        seq_len: N, the length of the random block.

    Returns:
        {"loss_first_copy": float, "loss_second_copy": float}, means in nats.
    """
    n = seq_len
    return {"loss_first_copy": float(token_losses[:, 1:n].mean()),
            "loss_second_copy": float(token_losses[:, n + 1:2 * n].mean())}
