"""Heads as typed values: `HeadRef(layer, head)` and helpers over sets of them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from headlab.errors import HeadIndexError

_HEAD_RE = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class HeadRef:
    """One query head: `layer` and `head` are 0-based indices; `str(ref)` is the display form `L3H1`.

    Attributes:
        layer: the layer index (a non-negative int).
        head: the query-head index within the layer (a non-negative int).

    Raises:
        HeadIndexError: an index that is not a non-negative int.
    """

    layer: int
    head: int

    def __post_init__(self) -> None:
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HeadIndexError(f"HeadRef.{name} must be a non-negative int, got {value!r}")

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, text: str) -> "HeadRef":
        """Parse the display form `L18H6` (for command lines and app inputs only).

        Args:
            text: `L<layer>H<head>`.

        Returns:
            The HeadRef.

        Raises:
            HeadIndexError: text not of that form.
        """
        match = _HEAD_RE.match(text)
        if match is None:
            raise HeadIndexError(f"cannot read {text!r} as a head: write it as L<layer>H<head>, e.g. L18H6")
        return cls(int(match.group(1)), int(match.group(2)))

    def tl_hook(self, name: str = "hook_pattern") -> str:
        """The TransformerLens hook name of this head's layer (the head is the index on the head axis).

        Args:
            name: the hook point within the attention block.

        Returns:
            `blocks.{layer}.attn.{name}`, e.g. `blocks.3.attn.hook_pattern`.
        """
        return f"blocks.{self.layer}.attn.{name}"


def as_heads(heads: Iterable[HeadRef | tuple[int, int] | str] | HeadRef) -> list[HeadRef]:
    """Normalise a head, a list of heads, (layer, head) pairs or `L3H1` strings to a sorted list of HeadRefs.

    Args:
        heads: a HeadRef or `L3H1` string, or an iterable of HeadRefs, (layer, head) pairs and strings.

    Returns:
        The distinct heads, sorted by (layer, head).

    Raises:
        HeadIndexError: an item that is not a head, or a string not of the form `L3H1`.
    """
    if isinstance(heads, (HeadRef, str)):
        heads = [heads]
    out = set()
    for item in heads:
        if isinstance(item, HeadRef):
            out.add(item)
        elif isinstance(item, str):
            out.add(HeadRef.parse(item))
        elif isinstance(item, tuple) and len(item) == 2:
            out.add(HeadRef(int(item[0]), int(item[1])))
        else:
            raise HeadIndexError(f"not a head: {item!r} (use HeadRef(layer, head), a (layer, head) pair or 'L3H1')")
    return sorted(out)


def by_layer(heads: Iterable[HeadRef]) -> dict[int, list[int]]:
    """Group heads by layer: {layer: [head, ...]} with sorted head indices."""
    out: dict[int, list[int]] = {}
    for ref in sorted(set(heads)):
        out.setdefault(ref.layer, []).append(ref.head)
    return out


def heads_per_group(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per KV group (grouped-query attention): query head h reads KV group h // heads_per_group."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise HeadIndexError(f"{n_heads} query heads cannot share {n_kv_heads} KV groups evenly")
    return n_heads // n_kv_heads
