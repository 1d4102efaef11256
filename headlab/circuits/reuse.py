"""Circuit reuse across tasks (Merullo et al.): how much two tasks' head sets overlap, against two null models.

A task's head set at fraction k is its top k·(L·H) heads by |exact patching effect|. For each pair of tasks:

- IoU = |A ∩ B| / |A ∪ B| and the shared share |A ∩ B| / k·(L·H) (the paper's "25 of 32 heads shared = 78%");
- null 1 (`random`): two random head sets of the same size, uniformly over all heads;
- null 2 (`layer_profile`): random sets that keep each circuit's number of heads per layer (circuits sit in the upper
  layers; overlap from that alone is not reuse);
- p-values: the share of null draws whose overlap is at least the observed one;
- sign agreement: among shared heads, the share whose effects have the same sign in both tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch

from headlab.heads import HeadRef

FRACTIONS = (0.02, 0.05, 0.10)


def top_heads(effect: torch.Tensor, fraction: float) -> set[HeadRef]:
    """The top `fraction` of heads (at least one) by |effect| `[L, H]` (NaN last, ties by (layer, head)).

    Args:
        effect: `[L, H]` effects.
        fraction: in (0, 1]; the set has max(1, round(fraction · L · H)) heads.

    Returns:
        The set of HeadRefs.

    Raises:
        ValueError: a fraction outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = effect.flatten().abs().nan_to_num(-1.0)
    k = max(1, round(fraction * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    n_heads = effect.shape[1]
    return {HeadRef(i // n_heads, i % n_heads) for i in order}


def _per_layer(heads: set[HeadRef], n_layers: int) -> list[int]:
    counts = [0] * n_layers
    for h in heads:
        counts[h.layer] += 1
    return counts


def _random_sets(generator: torch.Generator, draws: int, n_layers: int, n_heads: int, size: int | None = None,
                 profile: list[int] | None = None) -> torch.Tensor:
    """Bool `[draws, L·H]` random head sets: `size` heads uniformly, or `profile[l]` heads in each layer l."""
    out = torch.zeros(draws, n_layers * n_heads, dtype=torch.bool)
    if profile is None:
        idx = torch.rand(draws, n_layers * n_heads, generator=generator).argsort(dim=1)[:, :size]
        out.scatter_(1, idx, True)
        return out
    for layer, count in enumerate(profile):
        if count:
            idx = torch.rand(draws, n_heads, generator=generator).argsort(dim=1)[:, :count] + layer * n_heads
            out.scatter_(1, idx, True)
    return out


@dataclass
class PairOverlap:
    """The overlap of two tasks' head sets at one fraction, with both nulls.

    Attributes:
        a: the first task (names sorted).
        b: the second task.
        fraction: the head-set size as a fraction of all heads.
        size: heads per set.
        shared: the heads in both sets ("L3H1" strings, sorted).
        iou: |A ∩ B| / |A ∪ B|.
        share: |A ∩ B| / size.
        sign_agreement: among shared heads, the share whose effects have one sign in both tasks (None if none
            shared).
        null_random: {"iou_mean", "share_mean", "p_value"} for random sets of the same size.
        null_layer_profile: the same for random sets keeping each circuit's heads per layer.
    """

    a: str
    b: str
    fraction: float
    size: int
    shared: list[str]
    iou: float
    share: float
    sign_agreement: float | None
    null_random: dict[str, float]
    null_layer_profile: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The overlap as a JSON-ready dict (its fields).

        Returns:
            {field: value}; `PairOverlap(**d)` rebuilds it.
        """
        return dict(self.__dict__)


def overlap(effects: dict[str, torch.Tensor], *, fractions: tuple[float, ...] = FRACTIONS, draws: int = 10000,
            seed: int = 0) -> list[PairOverlap]:
    """Overlap of every pair of tasks' head sets at each fraction, with the two nulls.

    Args:
        effects: task name → exact patching effect `[L, H]` (all of one model).
        fractions: head-set sizes as fractions of all heads.
        draws: samples per null.
        seed: the nulls' generator seed.

    Returns:
        One PairOverlap per fraction and pair of tasks (pairs in sorted-name order).

    Raises:
        ValueError: fewer than two tasks, or effect maps of different shapes.
    """
    if len(effects) < 2:
        raise ValueError(f"overlap needs at least two tasks, got {sorted(effects)}")
    shapes = {tuple(e.shape) for e in effects.values()}
    if len(shapes) != 1:
        raise ValueError(f"the tasks' effect maps have different shapes {sorted(shapes)}: one model per comparison")
    n_layers, n_heads = shapes.pop()
    out = []
    for fraction in fractions:
        sets = {t: top_heads(e, fraction) for t, e in effects.items()}
        for a, b in combinations(sorted(effects), 2):
            sa, sb = sets[a], sets[b]
            shared = sa & sb
            size = len(sa)
            iou = len(shared) / len(sa | sb)
            share = len(shared) / size
            signs = [bool(torch.sign(effects[a][h.layer, h.head]) == torch.sign(effects[b][h.layer, h.head]))
                     for h in shared]
            gen = torch.Generator().manual_seed(seed)
            nulls = {}
            for name, kw_a, kw_b in (
                ("random", {"size": size}, {"size": size}),
                ("layer_profile", {"profile": _per_layer(sa, n_layers)}, {"profile": _per_layer(sb, n_layers)}),
            ):
                ra = _random_sets(gen, draws, n_layers, n_heads, **kw_a)
                rb = _random_sets(gen, draws, n_layers, n_heads, **kw_b)
                inter = (ra & rb).sum(1).float()
                union = (ra | rb).sum(1).float()
                null_iou = inter / union
                nulls[name] = {"iou_mean": float(null_iou.mean()), "share_mean": float((inter / size).mean()),
                               "p_value": float(((null_iou >= iou - 1e-12).sum() + 1) / (draws + 1))}
            out.append(PairOverlap(a=a, b=b, fraction=fraction, size=size, shared=sorted(map(str, shared)), iou=iou,
                                   share=share, sign_agreement=(sum(signs) / len(signs)) if signs else None,
                                   null_random=nulls["random"], null_layer_profile=nulls["layer_profile"]))
    return out


def overlap_matrix(pairs: list[PairOverlap], tasks: list[str], fraction: float, *, key: str = "iou") -> torch.Tensor:
    """`[n, n]` matrix of one overlap measure at one fraction (1 on the diagonal).

    Args:
        pairs: the PairOverlaps of `overlap`.
        tasks: the tasks, in matrix order.
        fraction: the fraction to read.
        key: the PairOverlap field ("iou", "share", ...).

    Returns:
        A symmetric float tensor `[n, n]`.
    """
    m = torch.eye(len(tasks))
    for p in pairs:
        if abs(p.fraction - fraction) < 1e-12 and p.a in tasks and p.b in tasks:
            i, j = tasks.index(p.a), tasks.index(p.b)
            m[i, j] = m[j, i] = getattr(p, key)
    return m


@dataclass
class Comparison:
    """Every pair's overlap, saved as `comparison.json`.

    Attributes:
        tasks: the tasks compared.
        pairs: one PairOverlap per fraction and pair.
        meta: run facts (model, draws, seed, folders, shared heads by role).
    """

    tasks: list[str]
    pairs: list[PairOverlap] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The comparison as a JSON-ready dict (what `comparison.json` holds).

        Returns:
            {"tasks", "pairs", "meta"}.
        """
        return {"tasks": self.tasks, "pairs": [p.to_json() for p in self.pairs], "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Comparison":
        """Rebuild a comparison from `to_json`'s dict.

        Args:
            data: {"tasks", "pairs", "meta"}.

        Returns:
            The Comparison.

        Raises:
            KeyError: a missing key.
            TypeError: pairs whose fields do not match PairOverlap's.
        """
        return cls(tasks=list(data["tasks"]), pairs=[PairOverlap(**p) for p in data["pairs"]], meta=data.get("meta", {}))

    def table(self, fraction: float) -> list[dict[str, Any]]:
        """One row per pair at a fraction: IoU, share, both nulls' mean IoU and p-values, sign agreement.

        Args:
            fraction: the head-set fraction to tabulate.

        Returns:
            Rows with keys a, b, heads, shared, iou, share, null_iou, p, layer_null_iou, p_layer, sign_agree.
        """
        return [{"a": p.a, "b": p.b, "heads": p.size, "shared": len(p.shared), "iou": round(p.iou, 3),
                 "share": round(p.share, 3), "null_iou": round(p.null_random["iou_mean"], 3),
                 "p": p.null_random["p_value"], "layer_null_iou": round(p.null_layer_profile["iou_mean"], 3),
                 "p_layer": p.null_layer_profile["p_value"],
                 "sign_agree": None if p.sign_agreement is None else round(p.sign_agreement, 3)}
                for p in self.pairs if abs(p.fraction - fraction) < 1e-12]
