"""Activation patching as a head edit: a head's output, or its query / key / value, taken from another run.

`Patch(head, z=values)` replaces the head's output (its slice of the output-projection input) by `values` — typically
the same head's output on a corrupted prompt (`run.z(head)` of a run with `with_z=True`). `Patch(head, k=values)`
(or q=, v=, several at once) recomputes the head's attention exactly with those inputs replaced: the query side of a
path-patching receiver, or a key set whose pattern should change. `positions` restricts the patch to some positions
(query positions for z and q; key positions for k and v), the same in every prompt or per prompt as a bool mask —
also the way to patch different heads in different copies of a batch run side by side.

It is an ordinary edit (a `layer_ops` object), used through `hl.edit`: the model is exactly as before outside the
block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from headlab.capture import HeadOverride, LayerOps, LayerRecord, fit_positions
from headlab.edits.heads import _one_head
from headlab.errors import EditError
from headlab.heads import HeadRef

_INPUTS = ("q", "k", "v")


@dataclass(frozen=True, eq=False)
class Patch:
    """Replace a head's output or inputs by values from another run (activation / path patching).

    Attributes:
        head: the head (HeadRef, (layer, head) or "L3H1").
        z: its output `[B|1, T, D]` (the per-head slice of the output-projection input).
        q: its post-RoPE query `[B|1, T, D]`.
        k: the post-RoPE key `[B|1, S, D]` this head reads (its KV group's, as `run.k(head)` gives); only this
            query head sees the patched keys, not the other heads of its group.
        v: the value `[B|1, S, D]` this head reads, likewise.
        positions: where to patch: None (everywhere), positions (a list or LongTensor, the same in every prompt) or a
            bool mask `[B|1, T]`. Query positions for z and q, key positions for k and v.

    Raises:
        EditError: no values, z given with q/k/v, values that are not `[B|1, T, D]` tensors, q/k/v on a
            linear-attention layer (its pattern is not a softmax of q·k; patch z there).
    """

    head: HeadRef
    z: torch.Tensor | None = field(default=None, kw_only=True)
    q: torch.Tensor | None = field(default=None, kw_only=True)
    k: torch.Tensor | None = field(default=None, kw_only=True)
    v: torch.Tensor | None = field(default=None, kw_only=True)
    positions: Any = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _one_head(self.head, "Patch"))
        given = {name: getattr(self, name) for name in ("z", *_INPUTS) if getattr(self, name) is not None}
        if not given:
            raise EditError(f"Patch({self.head}) needs values: z= (its output) or q= / k= / v= (its inputs)")
        if "z" in given and len(given) > 1:
            raise EditError(f"Patch({self.head}): give either z (the output) or q/k/v (the inputs), not both")
        for name, value in given.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise EditError(f"Patch({self.head}, {name}=...) needs a [B, T, D] tensor, got {shape}")
        object.__setattr__(self, "positions", _positions(self.positions, self.head))

    @property
    def targets(self) -> tuple[str, ...]:
        """What this patch replaces: ("z",) or some of ("q", "k", "v")."""
        return tuple(name for name in ("z", *_INPUTS) if getattr(self, name) is not None)

    def layer_ops(self, model: Any) -> dict[int, LayerOps]:
        """The seam ops of this patch on `model` (what `hl.edit` calls).

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps}: a replacement of the head's output, or an override recomputing its attention.

        Raises:
            EditError: values whose width is not the model's head dim.
            HeadIndexError: a head out of range.
        """
        model.check_heads([self.head])
        layer, head = self.head.layer, self.head.head
        for name in self.targets:
            width = getattr(self, name).shape[-1]
            if width != model.head_dim and not (name in ("q", "k") and model.layer_kinds[layer] != "softmax"):
                raise EditError(f"Patch({self.head}, {name}=...): values of width {width}, but {model.name} has "
                                f"head dim {model.head_dim}")
        if self.z is not None:
            where = self.positions
            return {layer: LayerOps(replace=((head, self.z.detach() if not self.z.requires_grad else self.z,
                                              where),))}
        if model.layer_kinds[layer] not in ("softmax", "swa"):
            raise EditError(f"Patch({self.head}, {'/'.join(self.targets)}=...): layer {layer} is a "
                            f"{model.layer_kinds[layer]} layer, whose pattern is not a softmax of q·k; patch its "
                            "output (z=) instead")
        values = {name: getattr(self, name) for name in self.targets}
        return {layer: LayerOps(overrides=(HeadOverride((head,), _patched_inputs(self.head, values, self.positions),
                                                        name="patch"),))}


def _positions(positions: Any, head: HeadRef) -> torch.Tensor | None:
    """None, or a bool mask `[B|1, T]` (positions given as indices become a `[1, max+1]` mask, widened at use)."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.dim() == 1:
            positions = positions[None]
        if positions.dim() != 2:
            raise EditError(f"Patch({head}): a positions mask must be [B, T] bool, got shape {tuple(positions.shape)}")
        return positions
    try:
        idx = torch.as_tensor(positions, dtype=torch.long).flatten()
    except (TypeError, ValueError):
        raise EditError(f"Patch({head}): positions must be None, indices or a bool mask, got {positions!r}") from None
    if idx.numel() == 0:
        raise EditError(f"Patch({head}): no positions given (None patches every position)")
    if bool((idx < 0).any()):
        raise EditError(f"Patch({head}): negative positions {idx[idx < 0].tolist()}")
    mask = torch.zeros(1, int(idx.max()) + 1, dtype=torch.bool)
    mask[0, idx] = True
    return mask


def _patched_inputs(head: HeadRef, values: dict[str, torch.Tensor], where: torch.Tensor | None):
    """Override: the head's attention recomputed exactly with some of its q / k / v replaced."""

    def fn(record: LayerRecord, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        h = heads[0]
        group = h // (record.q.shape[1] // record.k.shape[1])
        own = {"q": record.q[:, h], "k": record.k[:, group], "v": record.v[:, group]}  # [B, T|S, D]
        for name, value in values.items():
            target = own[name]
            if value.shape[0] not in (1, target.shape[0]) or value.shape[1:] != target.shape[1:]:
                raise EditError(f"Patch({head}, {name}=...): values of shape {tuple(value.shape)} do not fit this "
                                f"forward's {name} {tuple(target.shape)} ([B, T, D])")
            value = value.to(device=target.device, dtype=target.dtype)
            mask = None if where is None else fit_positions(where, target.shape[0], target.shape[1],
                                                             "queries" if name == "q" else "keys")
            own[name] = value.expand_as(target) if mask is None else torch.where(mask.to(target.device)[..., None],
                                                                                 value, target)
        scores = torch.matmul(own["q"].float(), own["k"].float().transpose(-1, -2)) * record.scale  # [B, Q, S]
        scores = scores.masked_fill(~record.visible()[:, 0], float("-inf"))
        pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = torch.matmul(pattern, own["v"].float())  # [B, Q, D]
        return out[:, :, None].to(record.v.dtype), pattern[:, None]

    return fn


@dataclass(frozen=True, eq=False)
class Attend:
    """Make a head attend uniformly over chosen keys at chosen query positions (its value mix recomputed exactly).

    Merullo et al.'s repair is this edit: at the last position, inhibition heads attend uniformly over the wrong
    answers' tokens. Queries not chosen, and chosen queries with no chosen visible key, keep the head's own output.

    Attributes:
        head: the head.
        keys: bool `[B|1, S]`: the keys to attend to.
        queries: bool `[B|1, Q]` (None: every query).

    Raises:
        EditError: masks that are not 2-D bool tensors, a linear-attention layer.
    """

    head: HeadRef
    keys: torch.Tensor = field(kw_only=True)
    queries: torch.Tensor | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _one_head(self.head, "Attend"))
        for name in ("keys", "queries"):
            mask = getattr(self, name)
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise EditError(f"Attend({self.head}, {name}=...) needs a bool [B, T] mask, got {shape}")

    def layer_ops(self, model: Any) -> dict[int, LayerOps]:
        """The seam ops of this edit on `model` (what `hl.edit` calls).

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps} with one override recomputing the head's pattern and output.

        Raises:
            EditError: the head's layer is not a softmax (or sliding-window) layer.
            HeadIndexError: a head out of range.
        """
        model.check_heads([self.head])
        layer = self.head.layer
        if model.layer_kinds[layer] not in ("softmax", "swa"):
            raise EditError(f"Attend({self.head}): layer {layer} is a {model.layer_kinds[layer]} layer")
        keys, queries = self.keys, self.queries

        def fn(record: LayerRecord, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            h = heads[0]
            group = h // (record.q.shape[1] // record.k.shape[1])
            batch, n_q, n_k = record.q.shape[0], record.q.shape[2], record.k.shape[2]
            own = record.pattern([h])[:, 0]  # [B, Q, S]
            key_mask = fit_positions(keys, batch, n_k, "keys").to(own.device)[:, None, :] & record.visible()[:, 0]
            uniform = key_mask.float() / key_mask.sum(-1, keepdim=True).clamp_min(1)
            rows = key_mask.any(-1)  # [B, Q]
            if queries is not None:
                rows = rows & fit_positions(queries, batch, n_q, "queries").to(own.device)
            pattern = torch.where(rows[..., None], uniform, own)
            out = torch.matmul(pattern, record.v[:, group].float())
            return out[:, :, None].to(record.v.dtype), pattern[:, None]

        return {layer: LayerOps(overrides=(HeadOverride((self.head.head,), fn, name="attend"),))}


@dataclass(frozen=True, eq=False)
class Add:
    """Add `delta` to a head's output (its slice of the output-projection input).

    `delta` is a steering vector `[D]`, or per-position values `[B|1, T, D]`. The head's own output keeps its autograd
    graph, so a zero `delta` that requires grad gives ∂metric/∂z while every path through the head stays intact
    (attribution patching).

    Attributes:
        head: the head (HeadRef, (layer, head) or "L3H1").
        delta: `[D]` or `[B|1, T, D]`, added to the head's output (keyword-only).

    Raises:
        EditError: a delta that is not a `[D]` or `[B|1, T, D]` tensor, or not finite.
    """

    head: HeadRef
    delta: torch.Tensor = field(kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _one_head(self.head, "Add"))
        d = self.delta
        if not isinstance(d, torch.Tensor) or d.dim() not in (1, 3):
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise EditError(f"Add({self.head}, delta=...) needs a [D] or [B, T, D] tensor, got {shape}")
        if not bool(torch.isfinite(d.detach()).all()):
            raise EditError(f"Add({self.head}, delta=...) is not finite")

    def layer_ops(self, model: Any) -> dict[int, LayerOps]:
        """The seam ops of this edit on `model` (what `hl.edit` calls).

        Args:
            model: the HeadModel being edited.

        Returns:
            {layer: LayerOps} adding `delta` to the head's output.

        Raises:
            EditError: a delta whose width is not the model's head dim.
            HeadIndexError: a head out of range.
        """
        model.check_heads([self.head])
        if self.delta.shape[-1] != model.head_dim:
            raise EditError(f"Add({self.head}): a delta of width {self.delta.shape[-1]}, but {model.name} has head dim "
                            f"{model.head_dim}")
        return {self.head.layer: LayerOps(add=((self.head.head, self.delta),))}
