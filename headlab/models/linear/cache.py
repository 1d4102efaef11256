"""Recurrent decoding for headlab's linear-attention LMs: `HeadlabLinearCache`, one entry per layer.

What each layer keeps (B batch, H heads, F feature dim of the mapped q/k, D head dim):

- linear / hedgehog / based: the state S = Σ_j φ(k_j) v_jᵀ `[B, H, F, D]` and the normaliser z = Σ_j φ(k_j) `[B, H, F]`
  (float32), so a new token costs φ(q)·S / (φ(q)·z + ε) and two rank-one updates;
- gla: the decayed state S = Σ_j diag(Π_{t>j} α_t) k_j v_jᵀ `[B, H, F, D]`;
- deltanet: the delta-rule state `[B, H, D, F]` (the kernels' layout: it maps keys to values);
- swa: the keys and values of the last window − 1 tokens (all a new token's window can still reach);
- softmax: every key and value (a KV cache);
- with short convolutions (config.short_conv = K > 0), every layer also keeps its last K − 1 q, k, v projection inputs
  to the convolution (`conv`, padded ones zeroed), so a decode step convolves over the same tokens as the full forward.

A prefill (an empty cache) runs the layers' chunked forms and keeps the state they return; a decode step of Q ≥ 1 new
tokens runs the recurrence from the kept state (O(1) work per token and layer for the linear kinds). Positions: the
cache counts the tokens it has seen (`get_seq_length`); the model embeds the new tokens at the next positions and
refuses (ValueError) to go past its max_position_embeddings learned positions.

Padding: the cache keeps a key mask of every token so far (None while all were real). Left- or right-padded batches
decode exactly as the prefix rerun does (padded keys write nothing, padded slots still take a position, as in a full
forward), so `generate` with or without the cache gives the same tokens.

Under headlab's seam a decode step still calls the attention interface: softmax / swa layers with the cached keys and
values (and a `[B, 1, Q, S]` mask), linear layers with a decode `LinearMixer` (`past` = the cached tokens,
`initial_state` = the layer's state). The implicit pattern row of a decode step needs every past key's features (and
GLA's decays, DeltaNet's β): `keep_keys=True` keeps them (and the raw keys and values, so the record's k and v span
every token, as a softmax layer's do, and swa layers keep every key too); without it `LayerRecord.pattern()` of a
linear layer's decode step raises `PatternUnavailable` naming the option, and the record's q, k, v hold the new tokens
only while its mask spans all past + Q keys (so an override reading `visible()` with `v`, e.g. a uniform ablation, fails
on the shapes instead of averaging over the new tokens alone: attention-level edits of linear layers at decode need
keep_keys; output-level edits (scale, zero / mean ablation, add, replace) do not). A swa layer's decode record without
keep_keys holds the window − 1 cached keys plus the new ones (as HF's sliding-window caches give the seam), so its
pattern's columns are those keys.

On CUDA the prefill of a cached forward runs the torch chunked forms (they return the state; the Triton kernels do
not), so it is slower than a plain forward there; the decode steps are the same either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from headlab.models.linear.config import LINEAR_KINDS
from headlab.models.linear.mixer import LinearMixer


def decode_mask(key_mask: torch.Tensor | None, batch: int, past: int, n_new: int, n_keys: int,
                window: int | None, device: torch.device) -> torch.Tensor:
    """Bool `[B, 1, Q, n_keys]` (True = may attend) of Q queries at positions past..past+Q−1 over the last n_keys keys.

    The rule of the full forward's `causal_masks`: causal ∧ real key (∧ within the window), and each query sees itself.
    `key_mask` `[B, past + Q]` (None: every token real).
    """
    total = past + n_new
    kpos = torch.arange(total - n_keys, total, device=device)
    qpos = torch.arange(past, total, device=device)
    vis = kpos[None, :] <= qpos[:, None]
    if window is not None:
        vis = vis & (qpos[:, None] - kpos[None, :] < window)
    if key_mask is None:
        return vis[None, None].expand(batch, 1, -1, -1)
    diag = kpos[None, :] == qpos[:, None]
    return (vis & key_mask[:, -n_keys:].to(device)[:, None, None, :]) | diag


class RecurrentLayerCache:
    """What the per-layer entries of the recurrent caches (`HeadlabLinearCache`, the linearized models'
    `LinearizedCache`) share: beam / batch reshuffles through the entry's `_map`, no cropping, nothing to offload.
    A subclass sets `cache_name` (for messages) and defines `_map(fn)` over the tensors it holds."""

    cache_name = "recurrent cache"
    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"a {self.cache_name} cannot be cropped (a recurrent state cannot forget tokens): "
                                  "decode from a copy of the cache instead (copy.deepcopy)")

    def offload(self) -> None:  # nothing to offload: the states are small
        pass

    def prefetch(self) -> None:
        pass

    def get_max_length(self) -> int:
        return -1


class HeadlabLinearLayerCache(RecurrentLayerCache):
    """One layer's entry of a `HeadlabLinearCache` (see the module docstring for what each kind keeps).

    Attributes:
        kind: the layer's kind; window: the sliding window (swa); keep_keys: see `HeadlabLinearCache`.
        keys, values: softmax / swa K and V `[B, H, S', ·]` as the layer attended with them (swa: the last
            window − 1 unless keep_keys); for a linear layer with keep_keys, its raw k and v of every token.
        state: a linear layer's recurrent state (linear kinds: (S, z); gla: S; deltanet: S `[B, H, D, F]`).
        fk, g, beta: with keep_keys, a linear layer's feature-mapped keys `[B, H, S, F]`, GLA's log decays
            `[B, H, S, F]`, DeltaNet's β `[B, H, S]` of every token (what the decode pattern rows need).
        conv: with short convolutions, the last K − 1 inputs of the q, k and v convolutions, three `[B, K − 1, ·]`
            (zeros before the first token, as the full forward pads), else None.
    """

    cache_name = "HeadlabLinearCache"

    def __init__(self, kind: str, window: int, keep_keys: bool = False) -> None:
        self.kind = kind
        self.window = window
        self.keep_keys = keep_keys
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.state: Any = None
        self.fk: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.beta: torch.Tensor | None = None
        self.conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        held = [name for name in ("keys", "state", "fk", "conv") if getattr(self, name) is not None]
        return f"HeadlabLinearLayerCache({self.kind}, holds {', '.join(held) or 'nothing'})"

    @property
    def is_initialized(self) -> bool:
        return self.state is not None or self.keys is not None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values", "fk", "g", "beta"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if isinstance(self.state, tuple):
            self.state = tuple(fn(t) for t in self.state)
        elif self.state is not None:
            self.state = fn(self.state)
        if self.conv is not None:
            self.conv = tuple(fn(t) for t in self.conv)

    def reset(self) -> None:
        self.keys = self.values = self.state = self.fk = self.g = self.beta = self.conv = None


class HeadlabLinearCache(Cache):
    """The decoding cache of a `HeadlabLinearForCausalLM`: per layer, a recurrent state or keys and values.

    Made by the model when a forward asks for `use_cache=True` without one (`generate` does), or by hand to pass to
    `generate(..., cache=...)` or `HeadModel.forward_cached(ids, cache)`.

    Args:
        config: the model's `HeadlabLinearConfig` (its layer kinds and window).
        keep_keys: also keep every past key's features, decays and β (and the raw keys and values) so that a decode
            step's implicit pattern row is available (`LayerRecord.pattern()`); O(T) memory per layer, like a KV cache.

    Attributes:
        length: tokens seen so far (= `get_seq_length()`; the next token's position).
        key_mask: bool `[B, length]` of the real tokens so far, or None while every token was real.
        layers: one `HeadlabLinearLayerCache` per layer.
    """

    def __init__(self, config: Any, *, keep_keys: bool = False) -> None:
        kinds = list(config.layer_kinds)
        super().__init__(layers=[HeadlabLinearLayerCache(kind, int(config.window), bool(keep_keys)) for kind in kinds])
        self.kinds = kinds
        self.keep_keys = bool(keep_keys)
        self.length = 0
        self.key_mask: torch.Tensor | None = None
        self._step: tuple[int, int, torch.Tensor | None] | None = None

    def __repr__(self) -> str:
        return (f"HeadlabLinearCache({self.length} tokens, layers {self.kinds}"
                f"{', keep_keys' if self.keep_keys else ''})")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (every layer has seen the same)."""
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[indices]

    def reset(self) -> None:
        super().reset()
        self.length, self.key_mask, self._step = 0, None, None

    # one forward: begin, the layers' steps, end

    def begin(self, n_new: int, attention_mask: torch.Tensor | None, limit: int | None = None
              ) -> tuple[int, torch.Tensor | None]:
        """Start a forward of `n_new` tokens; returns (tokens already cached, the new tokens' mask `[B, Q]` or None).

        `attention_mask` is `[B, past + Q]` (as `generate` passes it) or `[B, Q]` (the new tokens'), or None (all real).
        ValueError when the new tokens would pass `limit` positions (the model's learned positions).
        """
        if self._step is not None:
            raise RuntimeError("a forward on this HeadlabLinearCache stopped midway (an error inside a layer), so its "
                               "layers no longer hold the same tokens: start again from a new cache")
        past = self.length
        if limit is not None and past + n_new > limit:
            raise ValueError(f"the cache holds {past} tokens: {n_new} more would pass the model's {limit} learned "
                             f"positions (max_position_embeddings); decode at most {limit - past} more")
        new = None
        if attention_mask is not None:
            width = attention_mask.shape[-1]
            if width == past + n_new:
                new = attention_mask[:, past:]
            elif width == n_new:
                new = attention_mask
            else:
                raise ValueError(f"attention_mask covers {width} tokens: give the {past + n_new} cached and new "
                                 f"tokens' mask, or the {n_new} new ones'")
            new = new.bool()
        if self.key_mask is None and (new is None or bool(new.all())):
            full = None
        else:
            ref = new if new is not None else self.key_mask
            old = self.key_mask if self.key_mask is not None else \
                torch.ones(ref.shape[0], past, dtype=torch.bool, device=ref.device)
            full = torch.cat([old.to(ref.device), new if new is not None else
                              torch.ones(ref.shape[0], n_new, dtype=torch.bool, device=ref.device)], dim=1)
        self._step = (past, n_new, full)
        return past, new

    def end(self) -> None:
        """Finish the forward begun by `begin`: the cache now holds its tokens too."""
        past, n_new, full = self._current()
        self.length, self.key_mask, self._step = past + n_new, full, None

    def _current(self) -> tuple[int, int, torch.Tensor | None]:
        if self._step is None:
            raise RuntimeError("a layer used the HeadlabLinearCache outside a forward (call begin first)")
        return self._step

    def conv_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The last K − 1 inputs of a layer's q, k, v short convolutions before this forward (None at the prefill)."""
        past, _, _ = self._current()
        if not past:
            return None
        conv = self.layers[layer_idx].conv
        if conv is None:
            raise RuntimeError(f"layer {layer_idx} has no cached short-convolution inputs after {past} tokens: the cache "
                               "is not this model's (or was reset); start from a new cache")
        return conv

    def keep_conv_state(self, layer_idx: int, conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Keep the last K − 1 inputs of a layer's q, k, v short convolutions for the next step."""
        self._current()
        self.layers[layer_idx].conv = tuple(conv)

    def softmax_step(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A softmax / swa layer's keys, values and mask for this forward (the cached ones first); stores what the
        next step needs."""
        layer = self.layers[layer_idx]
        past, n_new, full = self._current()
        window = layer.window if layer.kind == "swa" else None
        if past:
            if layer.keys is None:
                raise RuntimeError(f"layer {layer_idx} has no cached keys after {past} tokens: the cache is not this "
                                   "model's (or was reset); start from a new cache")
            k = torch.cat([layer.keys, k], dim=2)
            v = torch.cat([layer.values, v], dim=2)
            mask = decode_mask(full, k.shape[0], past, n_new, k.shape[2], window, k.device)
        keep = k.shape[2] if window is None or layer.keep_keys else min(k.shape[2], window - 1)
        layer.keys, layer.values = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
        return k, v, mask

    def linear_step(self, layer_idx: int, mixer: LinearMixer, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[LinearMixer, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A linear layer's mixer (continuing from the cached state), k, v and mask for this forward; call
        `linear_done` with the mixer after the layer's attention call."""
        layer = self.layers[layer_idx]
        if layer.kind not in LINEAR_KINDS:
            raise ValueError(f"layer {layer_idx} is a {layer.kind} layer, not a linear one")
        past, n_new, full = self._current()
        if not past:
            if layer.keep_keys:
                layer.fk, layer.g, layer.beta, layer.keys, layer.values = mixer.fk, mixer.g, mixer.beta, k, v
            return dataclasses.replace(mixer, keep_state=True), k, v, mask
        if layer.state is None:
            raise RuntimeError(f"layer {layer_idx} has no cached state after {past} tokens: the cache is not this "
                               "model's (or was reset); start from a new cache")
        fk, g, beta = mixer.fk, mixer.g, mixer.beta
        if layer.keep_keys:
            fk = layer.fk = torch.cat([layer.fk, fk], dim=2)
            g = layer.g = torch.cat([layer.g, g], dim=2) if g is not None else None
            beta = layer.beta = torch.cat([layer.beta, beta], dim=2) if beta is not None else None
            k = layer.keys = torch.cat([layer.keys, k], dim=2)
            v = layer.values = torch.cat([layer.values, v], dim=2)
        step = dataclasses.replace(mixer, fk=fk, g=g, beta=beta, past=past, initial_state=layer.state, keep_state=True)
        # the query sees every past key (through the state): the mask says so even when k, v hold the new tokens only
        mask = decode_mask(full, k.shape[0], past, n_new, past + n_new, None, k.device)
        return step, k, v, mask

    def linear_done(self, layer_idx: int, mixer: LinearMixer) -> None:
        """Keep the state a linear layer's mixer left after its attention call."""
        if mixer.final_state is None:
            raise RuntimeError(f"layer {layer_idx}'s attention call did not run its mixer's forward, so the cache has no "
                               "state to keep")
        self.layers[layer_idx].state = mixer.final_state
