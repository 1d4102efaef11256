"""When a key is an attention sink (ACT, Yu et al. 2024): the rule shared by the sinks analysis and the ACT edit.

A low module (torch only) so that `edits.calibrate` need not import `analyses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True, kw_only=True)
class SinkRule:
    """When a key is a sink.

    Attributes:
        threshold: "absolute" (s_j > tau, ACT's code) or "relative" (s_j > alpha / N, N the prompt's real length).
        tau: the absolute threshold.
        alpha: the relative threshold's factor (unconfirmed in the paper; our default).
        min_visible: a key must be seen by at least min(min_visible, N) real queries (the tail rule; 1 = off).

    Raises:
        ValueError: an unknown threshold, or min_visible < 1.
    """

    threshold: Literal["absolute", "relative"] = "absolute"
    tau: float = 0.1
    alpha: float = 5.0
    min_visible: int = 32

    def __post_init__(self) -> None:
        if self.threshold not in ("absolute", "relative"):
            raise ValueError(f"SinkRule.threshold must be 'absolute' or 'relative', got {self.threshold!r}")
        if self.min_visible < 1:
            raise ValueError(f"SinkRule.min_visible must be >= 1, got {self.min_visible}")

    def describe(self) -> str:
        """Returns the rule in words, e.g. `s_j > 0.1, seen by >= min(32, N) queries`."""
        cut = f"s_j > {self.tau:g}" if self.threshold == "absolute" else f"s_j > {self.alpha:g}/N"
        return f"{cut}, seen by >= min({self.min_visible}, N) queries"


def qualifying(n_visible: torch.Tensor, min_visible: int) -> torch.Tensor:
    """Bool `[B, S]`: keys seen by at least min(min_visible, N) real queries (N = the most any key is seen by).

    Args:
        n_visible: `[B, S]` how many real queries see each key.
        min_visible: the tail rule's threshold (1 = off).

    Returns:
        Bool `[B, S]` (False for keys no query sees).
    """
    n_real = n_visible.amax(-1, keepdim=True)  # [B, 1]: all real queries see key 0 (causal) or every key (encoder)
    return (n_visible >= n_real.clamp(max=float(min_visible))) & (n_visible > 0)


def column_scores(received: torch.Tensor, n_visible: torch.Tensor, rule: SinkRule | None = None) -> torch.Tensor:
    """Column scores `[B, H, S]` from `received` `[B, H, S]` and `n_visible` `[B, S]`; NaN where the tail rule fails.

    Args:
        received: `[B, H, S]` attention each key receives, summed over queries.
        n_visible: `[B, S]` how many real queries see each key.
        rule: its `min_visible` is the tail rule (None: off).

    Returns:
        float `[B, H, S]`: received / n_visible.
    """
    ok = qualifying(n_visible, rule.min_visible if rule is not None else 1)[:, None]
    score = received / n_visible.clamp_min(1.0)[:, None]
    return torch.where(ok, score, torch.full_like(score, float("nan")))


def sink_mask(received: torch.Tensor, n_visible: torch.Tensor, rule: SinkRule) -> torch.Tensor:
    """Bool `[B, H, S]`: the sinks of each head under `rule`.

    Args:
        received: `[B, H, S]` attention each key receives, summed over queries.
        n_visible: `[B, S]` how many real queries see each key.
        rule: the threshold and the tail rule.

    Returns:
        Bool `[B, H, S]`: keys passing the tail rule whose column score exceeds the threshold.
    """
    score = received / n_visible.clamp_min(1.0)[:, None]
    if rule.threshold == "absolute":
        cut = torch.full_like(n_visible[:, :1], rule.tau)
    else:
        cut = rule.alpha / n_visible.amax(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    return qualifying(n_visible, rule.min_visible)[:, None] & (score > cut[:, :, None])


def exempt_first(mask: torch.Tensor) -> torch.Tensor:
    """The mask without its first True along the last axis (ACT's code leaves the first sink, usually BOS, alone).

    Args:
        mask: a bool tensor.

    Returns:
        The mask with the first True of each row cleared.
    """
    return mask & (mask.long().cumsum(-1) != 1)
