"""Rerun a model from the middle: each decoder layer's recorded input and call, replayed from a chosen layer on.

Patching one head changes nothing upstream of its layer, so exact activation patching only needs the layers from the
patched one on. `layer_inputs` records, in one forward, the residual stream entering every decoder layer and the
exact arguments the model passed it (masks, rotary cos/sin, position ids — whatever the family uses); `resume` then
calls the decoder layers from `start` on, the final norm and the unembedding, on `copies` stacked copies of the batch
(so many patched variants run in one batched forward). Every edit active in the context applies (the layers still call
headlab's seam). Nothing here is family-specific: the decoder layers are found as the ModuleList entries that hold the
attention modules, and their calls are replayed as recorded.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from headlab.errors import HeadIndexError, UnsupportedModelError

if TYPE_CHECKING:
    from headlab.models.head_model import HeadModel
    from headlab.run import Batch

#: where families keep the norm between the last decoder layer and the unembedding (attribute of the base model)
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def decoder_layers(model: "HeadModel") -> list[nn.Module]:
    """The decoder layer (block) holding each attention module: the attention module's ancestor that is an entry of a
    ModuleList."""
    found = []
    for name, _ in model._attn:  # noqa: SLF001 (same layer: the models package)
        parts = name.split(".")
        block = None
        for cut in range(len(parts) - 1, 0, -1):
            parent = model.hf.get_submodule(".".join(parts[: cut - 1])) if cut > 1 else model.hf
            if isinstance(parent, nn.ModuleList) and parts[cut - 1].isdigit():
                block = model.hf.get_submodule(".".join(parts[:cut]))
                break
        if block is None:
            raise UnsupportedModelError(f"{model.name}: found no decoder layer (a ModuleList entry) above {name}")
        found.append(block)
    return found


def final_norm(model: "HeadModel") -> nn.Module:
    """The norm the last layer's output passes through before the unembedding (Identity where a family has none)."""
    base = model.hf.base_model
    for attr in FINAL_NORMS:
        mod = getattr(base, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise UnsupportedModelError(f"{model.name}: no final norm among {FINAL_NORMS} on {type(base).__name__}")


def _tile(value: Any, batch: int, copies: int) -> Any:
    """Stack `copies` copies along the batch of every tensor that has the batch as its first of ≥ 2 dims."""
    if copies == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_tile(v, batch, copies) for v in value)
    if isinstance(value, list):
        return [_tile(v, batch, copies) for v in value]
    if isinstance(value, dict):
        return {k: _tile(v, batch, copies) for k, v in value.items()}
    return value


@dataclass
class LayerInputs:
    """One forward's per-layer inputs, replayable from any layer (`HeadModel.layer_inputs`).

    Attributes:
        batch: the encoded prompts.
        hidden: the residual stream entering each decoder layer, `[B, T, d]` per layer.
        logits: the forward's logits `[B, T, V]` (None for models without an LM head).
    """

    model: "HeadModel"
    batch: "Batch"
    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict, int]]  # per layer: (args without the hidden states, kwargs, its index in args)
    logits: torch.Tensor | None

    @property
    def size(self) -> int:
        """Prompts in the batch."""
        return int(self.hidden[0].shape[0])

    def resume(self, start: int, hidden: torch.Tensor | None = None, *, copies: int = 1,
               stop: int | None = None) -> torch.Tensor:
        """Run decoder layers `start .. stop-1` (default: to the end, then the final norm) from `hidden`.

        Args:
            start: the first layer to run.
            hidden: the residual entering `start`, `[copies·B, T, d]` (default: the recorded one, stacked `copies`
                times: copy i is rows `i·B .. (i+1)·B`).
            copies: how many copies of the batch run side by side (edits decide what differs between them).
            stop: stop before this layer and return its input residual (no final norm).

        Returns:
            `[copies·B, T, d]`: the final-normed hidden states (stop None) or the residual entering `stop`.
        """
        n = self.model.n_layers
        stop_at = n if stop is None else stop
        if not (isinstance(start, int) and 0 <= start <= stop_at <= n):
            raise HeadIndexError(f"resume({start}, stop={stop}) is out of range: {self.model.name} has layers 0..{n - 1}")
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        batch = self.size
        x = self.hidden[start].repeat(copies, 1, 1) if hidden is None else hidden
        if x.shape[0] != copies * batch or x.shape[1:] != self.hidden[start].shape[1:]:
            raise ValueError(f"resume: hidden of shape {tuple(x.shape)} does not fit {copies} copies of "
                             f"{tuple(self.hidden[start].shape)}")
        blocks = decoder_layers(self.model)
        for layer in range(start, stop_at):
            args, kwargs, at = self.calls[layer]
            args, kwargs = _tile(args, batch, copies), _tile(kwargs, batch, copies)
            if at < 0:
                out = blocks[layer](*args, hidden_states=x, **kwargs)
            else:
                out = blocks[layer](*args[:at], x, *args[at:], **kwargs)
            x = out[0] if isinstance(out, (tuple, list)) else out
        if stop is not None:
            return x
        return final_norm(self.model)(x)

    def unembed(self, hidden: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of chosen tokens at chosen positions, without the full vocabulary projection.

        Args:
            hidden: final-normed hidden states `[R, T, d]` (R = copies·B; row r is prompt r mod B).
            positions: `[B]` the position to read in each prompt.
            tokens: `[B, k]` the token ids to score in each prompt.
        Returns:
            `[R, k]` logits.
        """
        head = self.model.hf.get_output_embeddings()
        if head is None:
            raise UnsupportedModelError(f"{self.model.name} has no LM head to unembed with")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        prompt = rows % self.size
        h = hidden[rows, positions.to(hidden.device)[prompt]]  # [R, d]
        w = head.weight[tokens.to(hidden.device)[prompt]]  # [R, k, d]
        out = torch.einsum("rd,rkd->rk", h.to(w.dtype), w)
        bias = getattr(head, "bias", None)
        if bias is not None:
            out = out + bias[tokens.to(hidden.device)[prompt]]
        return out


def record_layer_inputs(model: "HeadModel", batch: "Batch", *, grad: bool = False) -> LayerInputs:
    """One forward of `batch` recording each decoder layer's input residual and call (edits in this context apply)."""
    blocks = decoder_layers(model)
    hidden: list[torch.Tensor | None] = [None] * len(blocks)
    calls: list[Any] = [None] * len(blocks)

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                x, rest, at = kwargs["hidden_states"], dict(kwargs), -1
                rest.pop("hidden_states")
                calls[layer] = (tuple(args), rest, at)
            else:
                x = args[0]
                calls[layer] = ((), dict(kwargs), 0) if len(args) == 1 else (tuple(args[1:]), dict(kwargs), 0)
            hidden[layer] = x if grad else x.detach()
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.set_grad_enabled(grad):
            out = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in hidden):
        missing = [i for i, h in enumerate(hidden) if h is None]
        raise UnsupportedModelError(f"{model.name}: layers {missing} were never called with hidden states")
    for layer, (args, kwargs, _) in enumerate(calls):
        for key in ("past_key_values", "past_key_value", "layer_past", "cache"):
            if kwargs.get(key) is not None:
                kwargs[key] = None  # replays never write a cache
        calls[layer] = (args, kwargs, calls[layer][2])
    return LayerInputs(model=model, batch=batch, hidden=hidden, calls=calls, logits=getattr(out, "logits", None))


@contextmanager
def gradient_dropped(model: "HeadModel", layer: int) -> Iterator[None]:
    """Inside the block, layer `layer` passes no gradient through its own computation (GradDrop, Kramár et al. 2024):
    its output is `x + (block(x) − x).detach()` — the same value, with the gradient carried only by the residual."""
    model.check_layers([layer])
    block = decoder_layers(model)[layer]
    inputs: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs):
        inputs["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def post(module, args, kwargs, out):
        x = inputs.pop("x")
        first = out[0] if isinstance(out, (tuple, list)) else out
        new = x + (first - x).detach()
        if isinstance(out, tuple):
            return (new, *out[1:])
        if isinstance(out, list):
            return [new, *out[1:]]
        return new

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
