"""What a pruning experiment measures: held-out perplexity on a text file, or a task's loss.

An eval is named by a spec string: `ppl:FILE` (perplexity over fixed windows of a text file) or
`task:NAME` (`task:induction`: loss on the second copy of `[BOS] r r`). The same objects give the
calibration loss that the ablation and AtP rankers measure (`loss(model, grad=True)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from headlab.analyses.induction import repeated_tokens
from headlab.errors import HeadlabError
from headlab.models.head_model import HeadModel
from headlab.losses import next_token_losses
from headlab.paths import TEXT_DIR
from headlab.inputs import windows

DATA_TEXT = TEXT_DIR
CALIB_TEXT = DATA_TEXT / "kjv-genesis-1-15.txt"
HELDOUT_TEXT = DATA_TEXT / "kjv-john.txt"


class Eval(Protocol):
    """A measurement of a (possibly edited) model: `metrics` for results, `loss` for rankers."""

    spec: str
    primary: str

    def loss(self, model: HeadModel, *, grad: bool = False) -> torch.Tensor:
        """The scalar loss the rankers measure (differentiable when `grad`)."""

    def metrics(self, model: HeadModel) -> dict[str, float]:
        """The numbers a result row records; `metrics[primary]` is the one plotted."""


@lru_cache(maxsize=8)
def _read_tokens(path: str, tokenizer) -> tuple[int, ...]:
    """The token ids of a whole text file (cached per file and tokenizer)."""
    # verbose=False: the whole file is longer than the model's context; it is cut into windows afterwards
    return tuple(tokenizer(Path(path).read_text(), add_special_tokens=False, verbose=False)["input_ids"])


@dataclass(frozen=True, kw_only=True)
class TextEval:
    """Perplexity on the first `windows` non-overlapping windows of `ctx` tokens of a text file.

    Each window is prefixed with the BOS token (the model's first-token slot, as in the scans);
    every next-token prediction inside a window counts.

    Attributes:
        path: the text file (UTF-8).
        ctx: tokens per window (before BOS).
        windows: how many windows (the batch is `[windows, 1 + ctx]`).
        minibatch: windows per forward.
        primary: the metric result rows plot ("ppl").
    """

    path: str
    ctx: int = 128
    windows: int = 8
    minibatch: int = 8
    primary: str = "ppl"

    @property
    def spec(self) -> str:
        """`ppl:FILE`."""
        return f"ppl:{self.path}"

    def tokens(self, model: HeadModel) -> torch.Tensor:
        """`[windows, 1 + ctx]` token ids: the file's first `windows · ctx` tokens, each window after BOS.

        Args:
            model: the model whose tokenizer and BOS (else pad) id to use.

        Returns:
            A LongTensor `[windows, 1 + ctx]`.

        Raises:
            HeadlabError: no tokenizer, no such file, or a file with fewer than `windows · ctx` tokens.
        """
        if model.tokenizer is None:
            raise HeadlabError(f"{self.spec} needs a tokenizer and {model.name} has none: use task:induction")
        path = Path(self.path)
        if not path.is_file():
            raise HeadlabError(f"no such text file for {self.spec}")
        ids = _read_tokens(str(path.resolve()), model.tokenizer)
        need = self.ctx * self.windows
        if len(ids) < need:
            raise HeadlabError(f"{path} has {len(ids)} tokens, fewer than {self.windows} windows × {self.ctx}")
        bos = model.bos_id if model.bos_id is not None else model.pad_id
        return windows(torch.tensor(ids[:need], dtype=torch.long), self.ctx, count=self.windows, bos=bos)

    def loss(self, model: HeadModel, *, grad: bool = False) -> torch.Tensor:
        """Mean next-token loss over all windows (a scalar; differentiable when `grad`).

        Args:
            model: the (possibly edited) model.
            grad: keep the autograd graph.

        Returns:
            A scalar tensor, in nats.

        Raises:
            HeadlabError: as `tokens`.
        """
        tokens = self.tokens(model)
        parts = [model.loss(chunk, grad=grad) * len(chunk) for chunk in tokens.split(self.minibatch)]
        return torch.stack(parts).sum() / len(tokens)

    def metrics(self, model: HeadModel) -> dict[str, float]:
        """Perplexity exp(mean loss), the loss, and the number of windowed tokens.

        Args:
            model: the (possibly edited) model.

        Returns:
            {"ppl", "loss", "tokens"}.

        Raises:
            HeadlabError: as `tokens`.
        """
        loss = float(self.loss(model))
        return {"ppl": math.exp(loss), "loss": loss, "tokens": self.ctx * self.windows}


@dataclass(frozen=True, kw_only=True)
class InductionTask:
    """Loss and top-1 accuracy on the second copy of `[BOS] r r` (random blocks of `seq_len` tokens).

    Attributes:
        seq_len: N, the block length.
        batch: number of sequences.
        seed: seed of the token sampler (the eval and the calibration use different seeds).
        primary: the metric result rows plot ("loss").
    """

    seq_len: int = 32
    batch: int = 16
    seed: int = 1
    primary: str = "loss"

    @property
    def spec(self) -> str:
        """`task:induction`."""
        return "task:induction"

    def _second_copy(self, model: HeadModel, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and hits `[B, N-1]` of the second copy's predictable targets."""
        tokens = repeated_tokens(model, seq_len=self.seq_len, batch=self.batch, seed=self.seed)
        batch = model.encode(tokens)
        with torch.set_grad_enabled(grad):
            logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        n = self.seq_len
        window = slice(n + 1, 2 * n + 1)  # position t predicts token t+1: targets N+2 .. 2N
        losses = next_token_losses(logits[:, window], batch.input_ids[:, window])
        pred, target = logits[:, n + 1:2 * n], batch.input_ids[:, n + 2:2 * n + 1]
        return losses, pred.argmax(-1) == target

    def loss(self, model: HeadModel, *, grad: bool = False) -> torch.Tensor:
        """Mean loss over the second copy's predictable targets.

        Args:
            model: the (possibly edited) model.
            grad: keep the autograd graph.

        Returns:
            A scalar tensor, in nats.
        """
        return self._second_copy(model, grad)[0].mean()

    def metrics(self, model: HeadModel) -> dict[str, float]:
        """Second-copy loss and top-1 accuracy.

        Args:
            model: the (possibly edited) model.

        Returns:
            {"loss", "acc"}.
        """
        losses, hits = self._second_copy(model, False)
        return {"loss": float(losses.mean()), "acc": float(hits.float().mean())}


def parse_eval(spec: str, *, ctx: int = 128, windows: int = 8, seed: int = 1, seq_len: int = 32) -> Eval:
    """An Eval from its spec (`ppl:FILE` or `task:induction`).

    Args:
        spec: `ppl:FILE` (held-out perplexity of a text file) or `task:induction`.
        ctx: tokens per window (ppl).
        windows: number of windows (ppl).
        seed: seed of the task's tokens (task).
        seq_len: the task's block length N (task).

    Returns:
        A TextEval or an InductionTask.

    Raises:
        HeadlabError: an unknown spec.
    """
    kind, _, arg = spec.partition(":")
    if kind == "ppl" and arg:
        return TextEval(path=arg, ctx=ctx, windows=windows)
    if kind == "task" and arg == "induction":
        return InductionTask(seed=seed, seq_len=seq_len)
    raise HeadlabError(f"unknown eval {spec!r}: use ppl:FILE (held-out perplexity of a text file) or task:induction")


def default_calibration(model: HeadModel) -> str:
    """The calibration spec rankers use by default: KJV Genesis 1–15 with a tokenizer, else the induction task.

    Args:
        model: the model to calibrate on.

    Returns:
        An eval spec string (`ppl:<path>` or `task:induction`).
    """
    return f"ppl:{CALIB_TEXT}" if model.tokenizer is not None else "task:induction"
