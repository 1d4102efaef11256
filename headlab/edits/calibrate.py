"""ACT's attention calibration (Yu et al. 2024) as a scoped head edit: less attention on sinks, the rest in proportion.

For each chosen head, at prefill: A[:, S] ← β·A[:, S], and each row's removed mass (1 − β)·Σ_{j∈S} A_ij goes to
the row's non-sink keys in proportion to their weights, so rows still sum to 1. A row with no non-sink mass is left
as it is (ACT's code sets its row 0 to [1, 0, …]; the same here). The sink set S is found per input and per head from
the head's own pattern over the whole prompt, as their code does: the keys whose column score passes a `SinkRule`,
less the first of them (usually the first token) when `first_exempt`; or it is given as fixed positions. Decode
steps of a KV cache (fewer queries than keys) get plain attention: their code calibrates the prefill only.

    with hl.edit(model, Calibrate(heads=[HeadRef(5, 3)], beta=0.4)):
        logits = model.forward(prompt).logits
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from headlab.sink_rule import SinkRule, exempt_first, sink_mask
from headlab.capture import HeadOverride, LayerOps, LayerRecord, attend
from headlab.errors import EditError
from headlab.heads import HeadRef, as_heads, by_layer
from headlab.models.head_model import HeadModel


def calibrate_pattern(pattern: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT's transform of patterns `[B, h, Q, S]` given sink keys `[B|1, h|1, S]` (bool): sinks keep β of theirs.

    Args:
        pattern: `[B, h, Q, S]` attention weights.
        sinks: bool `[B|1, h|1, S]` sink keys.
        beta: the share of their weight sinks keep.

    Returns:
        `[B, h, Q, S]`: the removed mass goes to each row's non-sink keys in proportion; rows with no non-sink mass
        are left as they are.
    """
    on = pattern * sinks[:, :, None, :]  # [B, h, Q, S] the weight on sinks
    mass = on.sum(-1, keepdim=True)  # [B, h, Q, 1]
    rest = pattern - on
    rest_sum = rest.sum(-1, keepdim=True)
    movable = rest_sum > 0
    share = torch.where(movable, rest / rest_sum.clamp_min(torch.finfo(rest.dtype).tiny), torch.zeros_like(rest))
    calibrated = beta * on + rest + (1.0 - beta) * mass * share
    return torch.where(movable, calibrated, pattern)


def pattern_sinks(pattern: torch.Tensor, visible: torch.Tensor, rule: SinkRule, *,
                  first_exempt: bool = True) -> torch.Tensor:
    """Sink keys `[B, h, S]` of patterns `[B, h, Q, S]` (Q = S, a prefill) from their column scores.

    Args:
        pattern: `[B, h, Q, S]` prefill patterns.
        visible: bool `[B|1, 1, Q|1, S]`, which keys each query may see; a query that cannot see its own
            position is padding and adds nothing to the column sums.
        rule: when a key is a sink (its column score).
        first_exempt: leave each head's first sink out.

    Returns:
        Bool `[B, h, S]`.
    """
    n_b, _, n_q, n_s = pattern.shape
    vis = visible[:, 0].expand(-1, n_q, n_s)  # [B|1, Q, S]
    real_q = vis.diagonal(dim1=-2, dim2=-1)  # [B|1, Q]
    received = (pattern * real_q[:, None, :, None]).sum(-2)  # [B, h, S]
    n_visible = (vis & real_q[..., None]).sum(-2).float().expand(n_b, n_s)  # [B, S]
    sinks = sink_mask(received, n_visible, rule)
    return exempt_first(sinks) if first_exempt else sinks


@dataclass(frozen=True, kw_only=True)
class Calibrate:
    """ACT calibration of some heads, usable in `hl.edit(model, ...)`.

    Attributes:
        heads: the heads to calibrate.
        beta: the share of their weight that sink keys keep (ACT: 0.4).
        rule: how sinks are found per input (default: absolute τ = 0.1 with the tail rule, min_visible 32;
            `SinkRule(min_visible=1)` is ACT's code exactly).
        first_exempt: leave the first sink found alone (ACT's code does).
        positions: fixed sink positions for every input and head instead of the rule (e.g. (0,)).

    Raises:
        EditError: beta outside [0, 1].
        HeadIndexError: heads that cannot be read as heads.
    """

    heads: tuple[HeadRef, ...]
    beta: float = 0.4
    rule: SinkRule = field(default_factory=SinkRule)
    first_exempt: bool = True
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(as_heads(self.heads)))
        if not 0.0 <= self.beta <= 1.0:
            raise EditError(f"Calibrate(beta={self.beta}) must lie in [0, 1]: it is the share sinks keep")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def sinks(self, pattern: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The sink keys `[B|1, h|1, S]` of patterns `[B, h, Q, S]`.

        Args:
            pattern: `[B, h, Q, S]` prefill patterns.
            visible: bool `[B|1, 1, Q|1, S]` visibility.

        Returns:
            Bool `[1, 1, S]` for fixed positions, else `[B, h, S]` from the rule.
        """
        if self.positions is not None:
            mask = torch.zeros(pattern.shape[-1], dtype=torch.bool, device=pattern.device)
            mask[[p for p in self.positions if p < pattern.shape[-1]]] = True
            return mask[None, None]
        return pattern_sinks(pattern, visible, self.rule, first_exempt=self.first_exempt)

    def override(self, record: LayerRecord, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The HeadOverride function: the heads' outputs `[B, Q, h, D]` and calibrated patterns `[B, h, Q, S]`.

        Args:
            record: the layer's LayerRecord.
            heads: the heads to compute.

        Returns:
            (outputs `[B, Q, h, D]`, patterns `[B, h, Q, S]`); plain attention for decode steps.
        """
        if record.q.shape[2] != record.k.shape[2]:  # a decode step with a cache: ACT calibrates the prefill only
            return attend(record, heads)
        visible = record.visible()
        return attend(record, heads, lambda p: calibrate_pattern(p, self.sinks(p, visible), self.beta))

    def layer_ops(self, model: HeadModel) -> dict[int, LayerOps]:
        """One HeadOverride per layer holding chosen heads (what `hl.edit` calls).

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps with the calibrating override}.

        Raises:
            HeadIndexError: a head out of range.
        """
        model.check_heads(self.heads)
        return {layer: LayerOps(overrides=(HeadOverride(tuple(heads), self.override, name="act-calibrate"),))
                for layer, heads in by_layer(self.heads).items()}


def calibrate(heads: Iterable[HeadRef] | HeadRef, *, beta: float = 0.4, rule: SinkRule | None = None,
              first_exempt: bool = True) -> Calibrate:
    """A Calibrate edit (a convenience for `hl.edit(model, calibrate(heads))`).

    Args:
        heads: the heads to calibrate.
        beta: the share of their weight sinks keep.
        rule: how sinks are found (None: the default SinkRule).
        first_exempt: leave each head's first sink alone.

    Returns:
        The Calibrate edit.

    Raises:
        EditError: beta outside [0, 1].
    """
    return Calibrate(heads=tuple(as_heads(heads)), beta=beta, rule=rule or SinkRule(), first_exempt=first_exempt)
