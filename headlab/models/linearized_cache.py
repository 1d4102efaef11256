"""Recurrent decoding for linearized Llama-family models (`headlab.models.linearized`): `LinearizedCache`.

What each layer keeps (B batch, H query heads, G KV groups, h_lin the layer's linear heads, 2F Hedgehog features,
D head dim):

- the linear heads' Hedgehog state S = Σ_j φ_h(k_j) v_jᵀ `[B, h_lin, 2F, D]` and normaliser z = Σ_j φ_h(k_j)
  `[B, h_lin, 2F]` (float32; heads in ascending order), so a new token costs φ(q)·S / (φ(q)·z + ε) and two rank-one
  updates, whatever the prompt length;
- a layer with softmax heads (a hybrid, or a layer whose heads are all softmax): the post-RoPE keys and the values
  of every KV group `[B, G, S, D]` (what its softmax heads attend over; all groups, so the seam's k and v are the
  model's own);
- with `keep_keys=True`, every layer keeps its keys and values too (what a decode step's implicit pattern row needs:
  the layer maps the past keys with its feature maps when the pattern is asked for; O(T) memory, like a KV cache).
  A layer with softmax heads keeps them anyway, so its decode patterns never need keep_keys.

Positions: each layer counts the tokens it has seen; `get_seq_length()` (layer 0's count) is where Llama's base
model starts the new tokens' positions (`position_ids`, hence RoPE) and sizes its mask. A forward that stopped
midway (an error inside a layer) leaves the layers with different counts: the next forward on the cache then refuses
(RuntimeError) instead of decoding from misaligned states.

Padding: the layers read which keys are real from the model's mask as a full forward does (a key no query may see
is padding): padded keys write nothing into the state, so a padded batch decoded with `generate` (which passes the
`[B, past + Q]` mask) gives the tokens of the prefix rerun. Without a mask every token counts as real.

The state is set by the layout of the model's softmax heads at the prefill; `set_softmax_heads` afterwards makes the
next forward on the cache refuse (start from a new cache). A recurrent state cannot forget tokens: `crop` raises
(decode from a copy of the cache instead, `copy.deepcopy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from headlab.models.linear.cache import RecurrentLayerCache


class LinearizedLayerCache(RecurrentLayerCache):
    """One layer's entry of a `LinearizedCache` (see the module docstring).

    Attributes:
        keep_keys: see `LinearizedCache`.
        softmax_heads: the layer's softmax heads when it was filled (None: not yet filled).
        length: tokens this layer has seen.
        keys, values: post-RoPE keys and values `[B, G, S, D]` (layers with softmax heads, or keep_keys), else None.
        state: the linear heads' (S `[B, h_lin, 2F, D]`, z `[B, h_lin, 2F]`), or None (no linear heads).
    """

    cache_name = "LinearizedCache"

    def __init__(self, keep_keys: bool = False) -> None:
        self.keep_keys = keep_keys
        self.softmax_heads: tuple[int, ...] | None = None
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        held = [name for name in ("keys", "state") if getattr(self, name) is not None]
        return f"LinearizedLayerCache({self.length} tokens, holds {', '.join(held) or 'nothing'})"

    @property
    def is_initialized(self) -> bool:
        return self.length > 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.state is not None:
            self.state = tuple(fn(t) for t in self.state)

    def reset(self) -> None:
        self.keys = self.values = self.state = self.softmax_heads = None
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


class LinearizedCache(Cache):
    """The decoding cache of a `HeadlabLinearizedForCausalLM`: per layer, the linear heads' Hedgehog state and the
    softmax heads' keys and values.

    The model makes one when a forward asks for `use_cache=True` without a cache (`generate`,
    `HeadModel.forward_cached`); make one by hand to pass to `generate(..., cache=...)` or
    `HeadModel.forward_cached(ids, cache)`, e.g. with keep_keys. (The ordinary KV cache stays available: pass a
    `transformers.DynamicCache` instead, and each new token's row is recomputed over every cached key.)

    Args:
        config: the model's `HeadlabLinearizedConfig` (its number of layers).
        keep_keys: also keep every past key and value in all-linear layers (layers with softmax heads keep them
            anyway), so that a decode step's implicit pattern row is available (`LayerRecord.pattern()`) and
            attention-level edits (uniform ablation) see every key; O(T) memory per layer, like a KV cache.

    Attributes:
        keep_keys: as given.
        layers: one `LinearizedLayerCache` per layer.
    """

    def __init__(self, config: Any, *, keep_keys: bool = False) -> None:
        super().__init__(layers=[LinearizedLayerCache(bool(keep_keys)) for _ in range(int(config.num_hidden_layers))])
        self.keep_keys = bool(keep_keys)

    def __repr__(self) -> str:
        return (f"LinearizedCache({self.get_seq_length()} tokens, {len(self.layers)} layers"
                f"{', keep_keys' if self.keep_keys else ''})")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (by layer `layer_idx`; every layer has seen the same after a forward)."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) of the model's mask: every cached token plus the new ones, from position 0."""
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer whose heads are all softmax (plain Llama attention, after `begin_layer`): append its keys and
        values, return every cached one."""
        layer = self.layers[layer_idx]
        n_new = key_states.shape[2]
        if layer.length and layer.keys is None:
            raise RuntimeError(f"layer {layer_idx} has no cached keys after {layer.length} tokens: its softmax heads "
                               "changed since the cache was filled (set_softmax_heads); start from a new cache")
        if layer.keys is not None:
            key_states = torch.cat([layer.keys, key_states], dim=2)
            value_states = torch.cat([layer.values, value_states], dim=2)
        layer.keys, layer.values = key_states, value_states
        layer.length += n_new
        return key_states, value_states

    def begin_layer(self, layer_idx: int, softmax_heads: tuple[int, ...], n_new: int) -> int:
        """The tokens layer `layer_idx` holds before this forward's `n_new` ones; the first forward records the
        layer's softmax heads. ValueError / RuntimeError where the cache does not fit: another model's cache, a
        forward on it that stopped midway, softmax heads changed since it was filled."""
        if layer_idx >= len(self.layers):
            raise ValueError(f"the LinearizedCache has {len(self.layers)} layers, the model has more: make the cache "
                             "with the model's own config")
        layer = self.layers[layer_idx]
        past = layer.length
        if layer_idx > 0:  # layer 0 already holds this forward's tokens
            expected = self.layers[0].length - n_new
            if past != expected:
                raise RuntimeError(f"layer {layer_idx} of this LinearizedCache holds {past} tokens where layer 0 held "
                                   f"{expected}: a forward on it stopped midway (an error inside a layer), so its "
                                   "layers no longer hold the same tokens; start again from a new cache")
        softmax_heads = tuple(softmax_heads)
        if not past:
            layer.softmax_heads = softmax_heads
        elif layer.softmax_heads != softmax_heads:
            raise RuntimeError(f"layer {layer_idx}'s softmax heads are {list(softmax_heads)} but were "
                               f"{list(layer.softmax_heads or ())} when this LinearizedCache was filled "
                               "(set_softmax_heads since): start from a new cache")
        return past
