"""Scoring multiple-choice items by the log-probabilities of their options, and intervals for accuracies.

An item is one forward of its prompt (right-padded batches, sorted by length); the score of option k is the
log-probability of its first token at the prompt's last real position (ACT's code compares the logits of the
options' tokens at the last position in the same way). Only the last position goes through the LM head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from headlab.errors import PromptError
from headlab.models.head_model import HeadModel
from headlab.run import Batch
from headlab.tasks.choice import ChoiceItem


@dataclass(frozen=True)
class EncodedItems:
    """Items as token ids.

    Attributes:
        ids: the prompts' token ids (N lists).
        options: `[N, K]` first token id of each option (K = the most options of any item; -1 pads).
        answer: `[N]` index of the right option.
        task: the task name of each item.
    """

    ids: list[list[int]]
    options: torch.Tensor
    answer: torch.Tensor
    task: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "EncodedItems":
        """The items at `index`, in that order.

        Args:
            index: item indices.

        Returns:
            The EncodedItems of those items.
        """
        idx = list(index)
        return EncodedItems([self.ids[i] for i in idx], self.options[idx], self.answer[idx],
                            [self.task[i] for i in idx])


def encode_items(model: HeadModel, items: Sequence[ChoiceItem], *, prepend_bos: bool = False) -> EncodedItems:
    """Tokenise prompts and options; every item's options must start with distinct tokens.

    Args:
        model: a HeadModel with a tokenizer.
        items: the ChoiceItems.
        prepend_bos: put the model's BOS before each prompt.

    Returns:
        EncodedItems: prompt ids, each option's first token id, answers and task names.

    Raises:
        PromptError: no tokenizer, options that do not start with distinct tokens, or a bad prompt.
    """
    if model.tokenizer is None:
        raise PromptError(f"{model.name} has no tokenizer: build EncodedItems from token ids instead")
    ids, options = [], []
    width = max(len(it.options) for it in items)
    for it in items:
        prompt = model.encode(it.prompt, prepend_bos=prepend_bos)
        ids.append(prompt.input_ids[0, : prompt.lengths[0]].tolist())
        first = [model.tokenizer(" " + o, add_special_tokens=False)["input_ids"][0] for o in it.options]
        if len(set(first)) != len(first):
            raise PromptError(f"options {it.options} of a {it.task} item do not start with distinct tokens")
        options.append(first + [-1] * (width - len(first)))
    answers = torch.tensor([it.answer for it in items])
    return EncodedItems(ids, torch.tensor(options), answers, [it.task for it in items])


def option_logprobs(model: HeadModel, items: EncodedItems, *, batch: int = 16, progress: bool = False,
                    desc: str = "scoring") -> torch.Tensor:
    """Log-probabilities `[N, K]` of each option's first token after each prompt (-inf where an item has fewer options).

    Runs whatever head edits are active in the caller's context (`with hl.edit(model, ...)`).

    Args:
        model: an LM HeadModel.
        items: the EncodedItems.
        batch: prompts per forward (prompts are sorted by length first).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        float32 `[N, K]` log-probabilities.

    Raises:
        PromptError: a model without an LM head.
    """
    if not model.is_lm:
        raise PromptError(f"{model.name} has no language-model head: options cannot be scored on it")
    order = sorted(range(len(items)), key=lambda i: len(items.ids[i]))
    out = torch.full(tuple(items.options.shape), float("-inf"))
    lm_head = model.hf.get_output_embeddings()
    chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        width = max(len(items.ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), model.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(items.ids[i])] = torch.tensor(items.ids[i])
            mask[row, : len(items.ids[i])] = 1
        b = model.encode(Batch(ids, mask))
        with torch.no_grad():
            hidden = model.hf.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
            last = hidden[torch.arange(len(chunk)), torch.tensor(b.lengths) - 1]  # [b, d]
            logp = lm_head(last).float().log_softmax(-1).cpu()  # [b, V]
        opts = items.options[chunk]  # [b, K]
        out[chunk] = torch.where(opts >= 0, logp.gather(-1, opts.clamp_min(0)), float("-inf"))
    return out


def correct(logprobs: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Bool `[N]`: whether the right option has the highest log-probability (ties count as wrong).

    Args:
        logprobs: `[N, K]` option log-probabilities.
        answer: `[N]` right options.

    Returns:
        Bool `[N]`.
    """
    right = logprobs.gather(-1, answer[:, None])[:, 0]
    others = logprobs.scatter(-1, answer[:, None], float("-inf")).max(-1).values
    return right > others


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default).

    Args:
        k: successes.
        n: trials.
        z: the normal quantile (1.96: 95%).

    Returns:
        (low, high) in [0, 1]; NaNs when n = 0.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(before: torch.Tensor, after: torch.Tensor, *, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(after) − mean(before) over items resampled in pairs.

    Args:
        before: per-item scores (e.g. bool right/wrong) before.
        after: per-item scores after, same items.
        reps: bootstrap resamples.
        seed: the resampling seed.
        level: the interval's coverage.

    Returns:
        (low, high); NaNs for no items.
    """
    n = len(before)
    if n == 0:
        return (float("nan"), float("nan"))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (reps, n), generator=gen)
    diff = (after.float()[idx] - before.float()[idx]).mean(-1)
    lo, hi = torch.quantile(diff, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return (lo, hi)
