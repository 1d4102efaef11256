"""RazorAttention's KV policy as a real cache: compressed KV heads keep only their kept entries in memory.

`RazorKV` (kv_policy.py) computes what a compressed cache would give while the full cache stays in memory; this
`RazorCache` is that compressed cache. Per layer it holds the retrieval KV heads' keys and values in full and, once
the cache reaches `compress_at` tokens (default: the length of the first forward, i.e. the prompt), the other KV
heads' `sinks` first tokens, their last `L = window_for(P)` tokens and one compensation token (the mean key and value
of the dropped tokens D, whose logit gets + log|D|), then every token decoding appends. A layer is compressed as soon
as the next layer's update shows its prefill attention is done, so the full cache of at most one layer is ever held
after the prompt.

KV heads of one layer then hold key sets of different lengths: `update` returns them padded to the longest, with a
per-KV-head additive key bias (−inf on padding and on keys a query may not see yet, log|D| on the compensation slot)
attached to the returned keys as `keys.headlab_key_bias` `[B|1, G, Q, S]`; headlab's seam turns it into the
backend's mask and records it (`LayerRecord.key_bias`), so outputs and patterns are those of the compressed cache.
Only models loaded by headlab (`attn_implementation="headlab"`) read the bias: the cache refuses other models.
A layer with no retrieval KV head returns only its compact entries (no padding at all).

Positions (RoPE) come from `get_seq_length()`, the number of tokens seen, so the model is unaware of what was
dropped. Batches must not be left-padded (every row's token i sits at position i), as for `RazorKV`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headlab.capture import IMPLEMENTATION
from headlab.errors import EditError

_COMP = -2  # the compensation slot's position: older than anything, visible to every query after compression
_PAD = -1  # a padding slot: never visible


class RazorLayer(CacheLayerMixin):
    """One decoder layer's entry of a `RazorCache`.

    Attributes:
        full: the layer's KV heads kept in full (sorted group indices); compressed: the others.
        keys, values: before compression, every KV head's `[B, G, S, D]`; after it, the full heads' `[B, Gf, S, D]`.
        ckeys, cvalues: after compression, the compressed heads' `[B, Gc, Sc, D]` (sinks, compensation, window,
            then decoded tokens); None before.
        cpos: absolute positions `[Sc]` of the compressed slots (`_COMP` for the compensation token).
        comp_bias: log|D| of the compensation slot (None: no compensation token).
        length: tokens seen by this layer.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, full: tuple[int, ...], n_groups: int) -> None:
        super().__init__()
        self.full = tuple(sorted(full))
        self.compressed = tuple(g for g in range(n_groups) if g not in self.full)
        self.ckeys: torch.Tensor | None = None
        self.cvalues: torch.Tensor | None = None
        self.cpos: torch.Tensor | None = None
        self.comp_bias: float | None = None
        self.length = 0
        self.done = False  # compressed (or nothing to compress)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def compress(self, policy: Any) -> None:
        """Keep the compressed heads' sinks, window and compensation token of the `length` tokens held now."""
        self.done = True
        n = self.length
        if not self.compressed or not self.is_initialized:
            return
        window = policy.window_for(n)
        lo, hi = min(policy.sinks, n), max(n - window, min(policy.sinks, n))
        if hi <= lo:  # nothing to drop: everything is within sinks + window
            return
        dev = self.keys.device
        comp = torch.tensor(self.compressed, device=dev)
        k, v = self.keys.index_select(1, comp), self.values.index_select(1, comp)  # [B, Gc, n, D]
        parts_k, parts_v, pos = [k[:, :, :lo]], [v[:, :, :lo]], [torch.arange(lo, device=dev)]
        if policy.compensation:
            parts_k.append(k[:, :, lo:hi].float().mean(2, keepdim=True).to(k.dtype))
            parts_v.append(v[:, :, lo:hi].float().mean(2, keepdim=True).to(v.dtype))
            pos.append(torch.tensor([_COMP], device=dev))
            self.comp_bias = math.log(hi - lo)
        parts_k.append(k[:, :, hi:])
        parts_v.append(v[:, :, hi:])
        pos.append(torch.arange(hi, n, device=dev))
        self.ckeys, self.cvalues, self.cpos = torch.cat(parts_k, 2), torch.cat(parts_v, 2), torch.cat(pos)
        keep = torch.tensor(self.full, device=dev, dtype=torch.long)
        self.keys, self.values = self.keys.index_select(1, keep), self.values.index_select(1, keep)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens `[B, G, Q, D]`; return every KV head's keys and values (padded to the longest, with
        the key bias attached to the keys) for this forward's attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new, start = key_states.shape[2], self.length
        self.length += n_new
        if self.ckeys is None:  # dense: nothing dropped (yet, or ever)
            self.keys = torch.cat([self.keys, key_states], 2)
            self.values = torch.cat([self.values, value_states], 2)
            return self.keys, self.values
        dev = key_states.device
        full = torch.tensor(self.full, device=dev, dtype=torch.long)
        comp = torch.tensor(self.compressed, device=dev, dtype=torch.long)
        self.keys = torch.cat([self.keys, key_states.index_select(1, full)], 2)
        self.values = torch.cat([self.values, value_states.index_select(1, full)], 2)
        self.ckeys = torch.cat([self.ckeys, key_states.index_select(1, comp)], 2)
        self.cvalues = torch.cat([self.cvalues, value_states.index_select(1, comp)], 2)
        self.cpos = torch.cat([self.cpos, torch.arange(start, self.length, device=dev)])
        return self._assembled(start, n_new)

    def _visible(self, pos: torch.Tensor, start: int, n_new: int) -> torch.Tensor:
        """Bias `[Q, S]` of slots at positions `pos` for queries at start..start+n_new−1 (causal; padding never)."""
        q = torch.arange(start, start + n_new, device=pos.device)[:, None]
        seen = (pos[None, :] <= q) & (pos[None, :] != _PAD)
        bias = torch.zeros(seen.shape, dtype=torch.float32, device=pos.device)
        if self.comp_bias is not None:
            bias = torch.where(pos[None, :] == _COMP, torch.full_like(bias, self.comp_bias), bias)
        return bias.masked_fill(~seen, float("-inf"))

    def _assembled(self, start: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full heads `[.., S]` and compressed heads `[.., Sc]` in one `[B, G, max(S, Sc), D]`, and its key bias."""
        n_groups = len(self.full) + len(self.compressed)
        cbias = self._visible(self.cpos, start, n_new)  # [Q, Sc]
        if not self.full:  # every KV head compressed: the compact entries as they are
            keys = self.ckeys.view_as(self.ckeys)
            keys.headlab_key_bias = cbias[None, None].expand(1, n_groups, -1, -1)
            return keys, self.cvalues
        s_full, s_comp = self.keys.shape[2], self.ckeys.shape[2]
        width = max(s_full, s_comp)
        b, _, _, d = self.keys.shape
        keys = self.keys.new_zeros(b, n_groups, width, d)
        values = self.values.new_zeros(b, n_groups, width, d)
        full = torch.tensor(self.full, device=keys.device, dtype=torch.long)
        comp = torch.tensor(self.compressed, device=keys.device, dtype=torch.long)
        keys[:, full, :s_full], values[:, full, :s_full] = self.keys, self.values
        keys[:, comp, :s_comp], values[:, comp, :s_comp] = self.ckeys, self.cvalues
        fpos = torch.full((width,), _PAD, device=keys.device, dtype=torch.long)
        fpos[:s_full] = torch.arange(s_full, device=keys.device)
        cpos = torch.full((width,), _PAD, device=keys.device, dtype=torch.long)
        cpos[:s_comp] = self.cpos
        bias = torch.empty(1, n_groups, n_new, width, dtype=torch.float32, device=keys.device)
        bias[0, full] = self._visible(fpos, start, n_new)
        bias[0, comp] = self._visible(cpos, start, n_new)
        keys.headlab_key_bias = bias
        return keys, values

    def nbytes(self) -> int:
        """Bytes of the keys and values this layer holds."""
        held = [t for t in (self.keys, self.values, self.ckeys, self.cvalues) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def entries(self) -> int:
        """KV entries held (one key and one value of one KV head at one slot), compensation slots included."""
        full = self.keys.shape[1] * self.keys.shape[2] if self.keys is not None else 0
        return full + (self.ckeys.shape[1] * self.ckeys.shape[2] if self.ckeys is not None else 0)

    def _map(self, fn) -> None:
        for name in ("keys", "values", "ckeys", "cvalues"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a RazorCache cannot be cropped (its dropped tokens are gone): decode from a copy "
                                  "(copy.deepcopy) instead")

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class RazorCache(Cache):
    """A KV cache that stores what RazorAttention keeps (see the module docstring).

    Args:
        model: the HeadModel it serves (its layers, KV heads and attention implementation are checked).
        policy: a `RazorKV` (its `full` retrieval KV heads, `sinks`, `window`, `window_frac`, `compensation`;
            `compress_at` None: compress after the first forward).

    Raises:
        EditError: the model does not run headlab's seam (the key bias would be ignored), the policy names KV
            heads outside the model, or a sliding policy (`compress_at` has to be a length or None: compress once).
    """

    is_compileable = False

    def __init__(self, model: Any, policy: Any) -> None:
        impl = getattr(model.hf.config, "_attn_implementation", None)
        if impl != IMPLEMENTATION:
            raise EditError(f"RazorCache needs a model loaded by headlab (attention implementation "
                            f"{IMPLEMENTATION!r}, got {impl!r}): load it with hl.load")
        for layer, group in policy.full:
            if not (0 <= layer < model.n_layers and 0 <= group < model.n_kv_heads):
                raise EditError(f"RazorKV.full names KV head ({layer}, {group}) outside {model.name}'s "
                                f"{model.n_layers} layers × {model.n_kv_heads} KV heads")
        full = {layer: tuple(g for l, g in policy.full if l == layer) for layer in range(model.n_layers)}
        super().__init__(layers=[RazorLayer(full[i], model.n_kv_heads) for i in range(model.n_layers)])
        self.policy = policy
        self.compress_at = policy.compress_at

    @classmethod
    def from_cache(cls, model: Any, policy: Any, cache: Any) -> "RazorCache":
        """A RazorCache holding what a prefilled full KV cache (e.g. transformers' DynamicCache) holds.

        It is compressed at its next update (`compress_at` defaults to the cache's length). The tensors are shared,
        not copied: pass a copy if the full cache is used again.

        Args:
            model: the HeadModel the cache serves.
            policy: the RazorKV policy.
            cache: the prefilled full cache (per-layer keys and values).

        Returns:
            The RazorCache.

        Raises:
            EditError: the cache has no per-layer keys and values of this model's layers.
        """
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != model.n_layers or any(getattr(l, "keys", None) is None for l in layers):
            raise EditError(f"RazorCache.from_cache needs a prefilled KV cache of {model.name}'s {model.n_layers} "
                            f"layers (keys and values per layer), got {type(cache).__name__}")
        out = cls(model, policy)
        for mine, theirs in zip(out.layers, layers):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values, mine.length = theirs.keys, theirs.values, int(theirs.keys.shape[2])
        if out.compress_at is None:
            out.compress_at = out.layers[0].length
        return out

    def __repr__(self) -> str:
        done = sum(layer.done for layer in self.layers)
        return f"RazorCache({self.get_seq_length()} tokens, {done}/{len(self.layers)} layers compressed)"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a layer's new keys and values (compressing layers whose prompt is done), as transformers calls it.

        Args:
            key_states: the new keys `[B, G, Q, D]`.
            value_states: the new values `[B, G, Q, D]`.
            layer_idx: the layer.
            args: passed to the layer's update.
            kwargs: passed to the layer's update.

        Returns:
            (keys, values) of every KV head of the layer for this forward's attention (padded to the longest, the key
            bias attached to the keys).
        """
        if self.compress_at is None and layer_idx == 0 and self.layers[0].length == 0:
            self.compress_at = key_states.shape[2]  # the first forward's length: compress after the prompt
        for i, layer in enumerate(self.layers):  # layers whose prompt attention is done (every layer but this one)
            if i != layer_idx and not layer.done and layer.length >= self.compress_at:
                layer.compress(self.policy)
        layer = self.layers[layer_idx]
        if not layer.done and layer.length >= self.compress_at:
            layer.compress(self.policy)
        return layer.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the cache has seen (held or dropped).

        Args:
            layer_idx: the layer.

        Returns:
            The layer's length in tokens.
        """
        return self.layers[layer_idx].length

    def nbytes(self) -> int:
        """Returns the bytes of keys and values held now, every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def fraction(self) -> dict[str, float]:
        """KV entries held against a full cache of the same tokens (as `RazorKV.cache_fraction` counts them).

        Returns:
            {"kept_entries", "full_entries", "fraction" (1.0 for an empty cache)}.
        """
        layers = self.layers
        n_groups = len(layers[0].full) + len(layers[0].compressed)
        full = sum(n_groups * layer.length for layer in layers)
        kept = sum(layer.entries() for layer in layers)
        return {"kept_entries": kept, "full_entries": full, "fraction": kept / full if full else 1.0}
