"""Scoped, reversible head edits: ablate (zero, mean, uniform) and scale a head's output.

No parameter is touched: edits act inside headlab's attention seam for the duration of
the `with` block, in the current thread/context only, so leaving the block (normally or
by an exception) restores the model bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch

from headlab.capture import Capture, HeadOverride, LayerOps, activate, uniform_attention
from headlab.errors import EditError, HeadIndexError
from headlab.heads import HeadRef, as_heads
from headlab.models.head_model import HeadModel


def _one_head(head: Any, what: str) -> HeadRef:
    """A HeadRef from the forms the rest of the API accepts: HeadRef, a (layer, head) pair, or "L3H1"."""
    if isinstance(head, HeadRef):
        return head
    try:
        refs = as_heads([head] if isinstance(head, (tuple, str)) else head)
    except (HeadIndexError, TypeError, ValueError) as err:
        raise EditError(f"{what}: {err}") from None
    if len(refs) != 1:
        hint = ": use headlab.ablate(heads) for several" if what == "Ablate" else ": give one edit per head"
        raise EditError(f"{what} takes one head, got {head!r}{hint}")
    return refs[0]


@dataclass(frozen=True)
class Ablate:
    """Ablate a head.

    Attributes:
        head: the head.
        how: "zero" zeroes its output (its slice of the output-projection input); "mean" replaces it by
            its mean output over `reference` (a prompt batch, required); "uniform" makes its attention
            uniform over the keys it may see.
        reference: prompts for "mean" ablation.

    Raises:
        EditError: more than one head, an unknown `how`, or "mean" without a reference.
    """

    head: HeadRef
    how: Literal["zero", "mean", "uniform"] = field(default="zero", kw_only=True)
    reference: Any = field(default=None, kw_only=True, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _one_head(self.head, "Ablate"))
        if self.how not in ("zero", "mean", "uniform"):
            raise EditError(f"Ablate(how={self.how!r}) is not an ablation: use 'zero', 'mean' or 'uniform'")
        if self.how == "mean" and self.reference is None:
            raise EditError(f"Ablate({self.head}, how='mean') needs reference=<prompts> to take the mean over")


@dataclass(frozen=True)
class Scale:
    """Multiply a head's output (its slice of the output-projection input) by `factor`.

    `factor` is a finite number, or a 0-dim tensor (e.g. one that requires grad: attribution patching is
    `Scale(head, factor=a)` with `a = 1` and `∂loss/∂a`, see `headlab.prune.rankers.atp_scores`).

    Attributes:
        head: the head (a HeadRef, a (layer, head) pair or "L3H1").
        factor: the multiplier (keyword-only): a finite number or a 0-dim tensor.

    Raises:
        EditError: more than one head, or a factor that is not finite or not a number / 0-dim tensor.
    """

    head: HeadRef
    factor: float | torch.Tensor = field(kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _one_head(self.head, "Scale"))
        f = self.factor
        if isinstance(f, torch.Tensor):
            if f.numel() != 1 or f.dim() != 0:
                raise EditError(f"Scale({self.head}) needs a number or a 0-dim tensor, got a tensor of shape "
                                f"{tuple(f.shape)}")
            if not bool(torch.isfinite(f.detach())):
                raise EditError(f"Scale({self.head}, factor={f.item()}) is not finite")
        elif isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise EditError(f"Scale({self.head}, factor={f!r}): the factor must be a finite number")


Edit = Ablate | Scale


def mean_head_outputs(model: HeadModel, reference: Any, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Mean per-head output `[H, D]` of each layer over the real tokens of a reference batch (no edits applied).

    Args:
        model: the HeadModel.
        reference: prompts, anything `HeadModel.encode` reads.
        layers: the layers whose head outputs to average.

    Returns:
        {layer: float32 `[H, D]`}: each head's output z (its slice of the output-projection input) averaged over
        the real (unpadded) tokens of the reference batch.

    Raises:
        PromptError: a bad reference prompt.
    """
    layers = sorted(set(layers))
    capture = Capture(layers=frozenset(layers), with_z=True, device=model.device)  # gathered (device maps)
    batch = model.encode(reference)
    with activate(model.owner, capture=capture, isolated=True), torch.no_grad():  # no edits apply, outer ones neither
        model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    weights = batch.attention_mask.to(torch.float32)[:, :, None, None]  # [B, T, 1, 1]
    out = {}
    for layer in layers:
        z = capture.records[layer].z.float()  # [B, T, H, D]
        out[layer] = (z * weights).sum((0, 1)) / weights.sum()
    return out


def compile_edits(model: HeadModel, edits: Iterable[Any]) -> dict[int, LayerOps]:
    """Validate edits and turn them into per-layer ops for the attention seam.

    Besides Ablate and Scale, any object with a `layer_ops(model) -> {layer: LayerOps}` method is an
    edit (calibrations, KV-cache policies): that is how analyses add their own. Mean ablations run one forward
    per reference batch to take the means.

    Args:
        model: the HeadModel the edits apply to.
        edits: Ablate, Scale and `layer_ops` objects.

    Returns:
        {layer: LayerOps}, the edits of each layer merged in order.

    Raises:
        EditError: not an edit, or one head's q/k/v patched by two Patch edits.
        HeadIndexError: a head or layer out of range.
    """
    edits = list(edits)
    ops: dict[int, LayerOps] = {}

    def add(layer: int, new: LayerOps) -> None:
        ops[layer] = ops[layer].merged(new) if layer in ops else new

    builtin, custom = [], []
    for e in edits:
        if isinstance(e, (Ablate, Scale)):
            model.check_heads([e.head])
            builtin.append(e)
        elif callable(getattr(e, "layer_ops", None)):
            custom.append(e)
        else:
            raise EditError(f"not a head edit: {e!r} (use headlab.Ablate, headlab.Scale, or an object with a "
                            "layer_ops(model) method)")
    edits = builtin
    for e in custom:
        for layer, new in e.layer_ops(model).items():
            model.check_layers([layer])
            add(layer, new)
    means: dict[int, torch.Tensor] = {}
    mean_edits = [e for e in edits if isinstance(e, Ablate) and e.how == "mean"]
    by_reference: dict[int, list[Ablate]] = {}
    for e in mean_edits:
        by_reference.setdefault(id(e.reference), []).append(e)
    for group in by_reference.values():
        layer_means = mean_head_outputs(model, group[0].reference, [e.head.layer for e in group])
        for e in group:
            means[id(e)] = layer_means[e.head.layer][e.head.head]

    for e in edits:
        layer, head = e.head.layer, e.head.head
        if isinstance(e, Scale):
            factor = e.factor if isinstance(e.factor, torch.Tensor) else float(e.factor)
            new = LayerOps(scale=((head, factor),))
        elif e.how == "zero":
            new = LayerOps(scale=((head, 0.0),))
        elif e.how == "uniform":
            new = LayerOps(overrides=(HeadOverride((head,), uniform_attention, name="uniform"),))
        else:
            new = LayerOps(replace=((head, means[id(e)], None),))
        add(layer, new)
    for layer, layer_ops in ops.items():  # one head's inputs patched twice: the later override would hide the first
        patched = [h for o in layer_ops.overrides if o.name == "patch" for h in o.heads]
        twice = sorted({h for h in patched if patched.count(h) > 1})
        if twice:
            raise EditError(f"head(s) {', '.join(f'L{layer}H{h}' for h in twice)} have their q/k/v patched by two "
                            "Patch edits: give the inputs in one Patch(head, q=..., k=..., v=...)")
    return ops


@contextmanager
def edit(model: HeadModel, edits: Iterable[Any] | Any) -> Iterator[HeadModel]:
    """Apply head edits inside a `with` block; the model is exactly as before once the block exits.

    The edits are private to this thread / asyncio task and end with the block, also when it raises. Nested
    blocks compose: attention-level overrides first, then output edits in nesting order (`LayerOps.merged`).

    Args:
        model: the HeadModel to edit.
        edits: an edit or a list of them: `Ablate`, `Scale`, or any object with `layer_ops(model)`.

    Yields:
        The same HeadModel, edited until the block exits.

    Raises:
        EditError: not an edit, a mean ablation without a reference.
        HeadIndexError: a head or layer out of range.
    """
    if isinstance(edits, (Ablate, Scale)) or callable(getattr(edits, "layer_ops", None)):
        edits = [edits]
    elif edits is None or isinstance(edits, (str, bytes)) or not isinstance(edits, Iterable):
        raise EditError(f"hl.edit takes an edit or a list of edits (headlab.Ablate, headlab.Scale, ...), got {edits!r}")
    ops = compile_edits(model, edits)
    with activate(model.owner, ops=ops):
        yield model


def ablate(heads: Iterable[HeadRef] | HeadRef, *, how: Literal["zero", "mean", "uniform"] = "zero",
           reference: Any = None) -> list[Ablate]:
    """One Ablate per head (a convenience for `edit(model, ablate(heads))`).

    Args:
        heads: a head or heads (HeadRefs, (layer, head) pairs or "L3H1" strings).
        how: "zero", "mean" (needs `reference`) or "uniform", as in `Ablate`.
        reference: prompts for "mean" ablation.

    Returns:
        A list of Ablate edits, one per head.

    Raises:
        HeadIndexError: a head that cannot be parsed.
        EditError: a bad `how`, or "mean" without a reference.
    """
    return [Ablate(h, how=how, reference=reference) for h in as_heads(heads)]
