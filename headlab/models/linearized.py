"""A pretrained Llama-family model linearized head by head (Hedgehog feature maps), model_type "headlab_linearized".

Each attention layer keeps the base model's projections and RoPE; each of its query heads is either kept as softmax
attention or replaced by Hedgehog linear attention: φ_h(x) = [softmax(x W_h + b_h), softmax(−(x W_h + b_h))] on the
post-RoPE query and key, o_i = Σ_{j≤i} φ(q_i)·φ(k_j) v_j / (Σ_{j≤i} φ(q_i)·φ(k_j) + ε). Which heads stay softmax is
the config's `softmax_heads` (one list per layer), so one set of trained feature maps gives every hybrid, chosen
head by head. The feature maps are trained by attention transfer with the base weights frozen
(`headlab.linearize`).

Under headlab's seam a layer with linear heads passes a `HybridMixer`: its implicit pattern is the Hedgehog pattern
for linear heads and softmax(q·k) for softmax heads, and `pattern @ v` is the layer's output (tested).

Decoding is recurrent (`LinearizedCache`, linearized_cache.py; what `generate` and `HeadModel.forward_cached` use): per
layer the linear heads' state S = Σ_j φ_h(k_j) v_jᵀ and z = Σ_j φ_h(k_j), and the keys / values of layers that have
softmax heads. The prefill runs the layer as a full forward and keeps the final state; a decode step of Q tokens
continues the recurrence (φ(q)·S / (φ(q)·z + ε): O(1) per token in the prompt length for the linear heads) while the
softmax heads attend over their cached keys. The step still goes through the seam with a decode `HybridMixer` (`past`,
`initial_state`): output edits (zero / mean ablation, Scale) apply as in a full forward, and its pattern rows span
every key so far; an all-linear layer keeps no keys, so there its pattern (and uniform ablation) needs
`LinearizedCache(config, keep_keys=True)` and otherwise raises `PatternUnavailable` (never a wrong row). The ordinary
KV cache stays available (pass a `transformers.DynamicCache`, or `generate(..., cache_implementation="dynamic")`): it
recomputes each new token's row over every cached key (O(T) per token), and gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from headlab_kernels.linear_attention import linear_attention
from headlab_kernels.linear_attention.reference import linear_chunked

from headlab.models.linear.mixer import PatternUnavailable
from headlab.models.linearized_cache import LinearizedCache


class HeadlabLinearizedConfig(LlamaConfig):
    """A Llama config plus the linearization: Hedgehog feature width and the heads kept as softmax.

    Args:
        feature_dim: width F of each head's map per sign (features: 2F).
        softmax_heads: per layer, the query heads kept as softmax attention (None: none, every head linear).
        linear_eps: ε of the normalised linear form.
        base_model: where the base weights came from (a note).
    """

    model_type = "headlab_linearized"

    def __init__(self, feature_dim: int = 64, softmax_heads: list[list[int]] | None = None, linear_eps: float = 1e-6,
                 base_model: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feature_dim = int(feature_dim)
        layers = int(self.num_hidden_layers)
        heads = int(self.num_attention_heads)
        if softmax_heads is None:
            softmax_heads = [[] for _ in range(layers)]
        softmax_heads = [sorted({int(h) for h in row}) for row in softmax_heads]
        if len(softmax_heads) != layers:
            raise ValueError(f"softmax_heads has {len(softmax_heads)} rows for {layers} layers")
        bad = [(i, h) for i, row in enumerate(softmax_heads) for h in row if not 0 <= h < heads]
        if bad:
            raise ValueError(f"softmax_heads names heads out of range (layer, head): {bad[:5]} ({heads} heads)")
        self.softmax_heads = softmax_heads
        self.linear_eps = float(linear_eps)
        self.base_model = base_model


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog's map of `x` `[B, h, T, D]` with per-head `weight` `[h, D, F]`, `bias` `[h, F]`: `[B, h, T, 2F]`.

    Args:
        x: post-RoPE queries or keys `[B, h, T, D]`.
        weight: `[h, D, F]`.
        bias: `[h, F]`.

    Returns:
        float32 `[B, h, T, 2F]` = [softmax(x W + b), softmax(−(x W + b))].
    """
    z = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float()) + bias.float()[None, :, None]
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


@dataclass
class HybridMixer:
    """One linearized layer's mixing inputs, for all H query heads (the seam's `mixer`).

    Attributes:
        kind: "hedgehog".
        fq: feature-mapped queries `[B, H, Q, 2F]` (zero for softmax heads).
        fk: feature-mapped keys `[B, H, S, 2F]` (zero at padded keys and for softmax heads).
        q: post-RoPE queries `[B, H, Q, D]`, read for softmax heads.
        k: post-RoPE keys `[B, G, S, D]` (G KV groups: query head h reads group h // (H / G)).
        softmax: the query heads kept as softmax attention.
        scale: the softmax scale.
        eps: ε of the linear form.
        key_mask: bool `[B, S]` real keys (None: all).
        g: unused here (None): the slot other mixers use for gates.
        beta: unused here (None): the slot other mixers use for delta-rule strengths.
        past: keys before the first query in a decode step of a `LinearizedCache` (0 otherwise). The queries are
            the last Q of `past + Q` tokens and `fk` holds the Q new keys' features; `k` holds every key when the
            cache kept them (a layer with softmax heads, or keep_keys), else the new ones only (then the linear
            heads' pattern raises `PatternUnavailable`).
        weight: the layer's feature-map weights `[H, D, F]` (a decode step's pattern maps the past keys with them,
            on demand), or None.
        bias: the feature-map biases `[H, F]`, or None.
        initial_state: a decode step's linear-head state after the `past` keys, (S `[B, h_lin, 2F, D]`, z
            `[B, h_lin, 2F]`) over the linear heads in ascending order; `forward` continues the recurrence from it.
        keep_state: `forward` also sets `final_state`, the linear heads' state after the last key (same layout).
        final_state: set by `forward` when keep_state.
    """

    kind: str
    fq: torch.Tensor
    fk: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    softmax: tuple[int, ...]
    scale: float
    eps: float = 1e-6
    key_mask: torch.Tensor | None = None
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    past: int = 0
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    initial_state: Any = None
    keep_state: bool = False
    final_state: Any = field(default=None, repr=False)

    @property
    def normalised(self) -> bool:
        """True: the linear heads' rows are normalised (each sums to 1 up to ε)."""
        return True

    @property
    def linear_heads(self) -> list[int]:
        """The layer's linear (Hedgehog) heads, ascending: the order of the state's head axis."""
        return [h for h in range(self.fq.shape[1]) if h not in self.softmax]

    @property
    def n_keys(self) -> int:
        """Keys the queries' rows span: every token so far (a decode step: past + Q)."""
        return self.past + self.fq.shape[2] if self.past else self.fk.shape[2]

    @property
    def has_pattern(self) -> bool:
        """Whether `pattern()` of the linear heads can be computed.

        True for a full forward, or a decode step whose cache kept every key (a layer with softmax heads, or
        keep_keys).
        """
        return self.fk.shape[2] == self.n_keys or (self.weight is not None and self.k.shape[2] == self.n_keys)

    def key_features(self, heads: list[int]) -> torch.Tensor:
        """The feature-mapped keys of every key so far for the given (linear) heads.

        Args:
            heads: linear head indices.

        Returns:
            `[B, h, S, 2F]` (zero at padded keys): `fk`'s rows, or in a decode step the cached keys mapped now.

        Raises:
            PatternUnavailable: a decode step whose cache did not keep the keys.
        """
        idx = torch.as_tensor(heads, device=self.fq.device)
        if self.fk.shape[2] == self.n_keys:
            return self.fk.index_select(1, idx)
        if not self.has_pattern:
            Q = self.fq.shape[2]
            raise PatternUnavailable(
                f"the pattern of this decode step's linear heads ({Q} new token(s) after {self.past} cached ones) "
                "needs the past keys, which the cache did not keep for this all-linear layer: make the cache with "
                "LinearizedCache(config, keep_keys=True) (e.g. generate(..., cache=LinearizedCache(model.config, "
                "keep_keys=True)) or forward_cached(ids, that cache)), decode with the ordinary KV cache "
                "(transformers.DynamicCache), or capture a full forward of the prefix instead")
        k = self.k.index_select(1, self._group(heads, self.k.shape[1]))
        f = hedgehog_features(k, self.weight.index_select(0, idx), self.bias.index_select(0, idx))
        if self.key_mask is not None:
            f = f * self.key_mask[:, None, :, None].to(f.dtype)
        return f

    def _group(self, heads: list[int], n_groups: int) -> torch.Tensor:
        """The KV group (of `n_groups`) each query head reads."""
        return torch.as_tensor(heads, device=self.fq.device) // (self.fq.shape[1] // n_groups)

    def _visible(self, rows: slice | None) -> torch.Tensor:
        Q, S = self.fq.shape[2], self.n_keys
        r = torch.arange(Q, device=self.fq.device)[rows if rows is not None else slice(None)] + (S - Q)
        vis = torch.arange(S, device=self.fq.device)[None, :] <= r[:, None]  # [n, S]
        vis = vis[None, None]
        if self.key_mask is not None:
            vis = vis & self.key_mask[:, None, None, :]
        return vis

    def pattern(self, heads: list[int] | None = None, rows: slice | None = None) -> torch.Tensor:
        """`[B, h, Q, S]` float32: Hedgehog's normalised weights for linear heads, softmax for softmax heads.

        For a decode step S = past + Q (every key so far; the rows are the new queries'): its linear heads map the
        cached keys, which a layer with softmax heads always keeps and an all-linear layer only with keep_keys.

        Args:
            heads: the query heads (None: all H).
            rows: a slice of the query rows (None: all).

        Returns:
            float32 `[B, h, Q, S]`; `pattern @ v` is the layer's output.

        Raises:
            PatternUnavailable: linear heads of a decode step whose cache did not keep the keys (never a row over the
                new keys alone).
        """
        heads = list(range(self.fq.shape[1])) if heads is None else list(heads)
        linear = [h for h in heads if h not in self.softmax]
        fk = dict(zip(linear, self.key_features(linear).unbind(1))) if linear else {}
        sel = slice(None) if rows is None else rows
        vis = self._visible(rows)
        out = []
        for h in heads:
            if h in self.softmax:
                g = int(self._group([h], self.k.shape[1]))
                s = torch.matmul(self.q[:, h, sel].float(), self.k[:, g].float().transpose(-1, -2)) * self.scale
                s = s.masked_fill(~vis[:, 0], float("-inf"))
                p = torch.softmax(s, -1).nan_to_num(0.0)
            else:
                a = torch.matmul(self.fq[:, h, sel], fk[h].transpose(-1, -2)) * vis[:, 0]
                p = a / (a.sum(-1, keepdim=True) + self.eps)
            out.append(p)
        return torch.stack(out, dim=1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The layer's mixing of values `[B, G, S, D]` (or per query head, `[B, H, S, D]`) → `[B, H, Q, D]`.

        A decode step (past > 0) runs the linear heads' recurrence from `initial_state` over the last Q keys and
        values only (O(1) in past); its softmax heads attend over every key (v then holds every token's value).

        Args:
            v: values `[B, G, S, D]` or `[B, H, S, D]`.

        Returns:
            float32 `[B, H, Q, D]`.

        Raises:
            ValueError: a decode step without `initial_state`, or softmax heads without every key's value.
        """
        Q, H = self.fq.shape[2], self.fq.shape[1]
        linear = self.linear_heads
        out = torch.zeros(v.shape[0], H, Q, v.shape[-1], dtype=torch.float32, device=v.device)
        if linear:
            idx = torch.tensor(linear, device=v.device)
            vl = v.index_select(1, self._group(linear, v.shape[1])).float()  # [B, h_lin, S, D]
            fq, fk = self.fq.index_select(1, idx), self.fk.index_select(1, idx)
            if self.past:
                if self.initial_state is None:
                    raise ValueError(f"a decode mixer ({self.past} keys before its queries) needs the cache's "
                                     "initial_state")
                o, state = linear_chunked(fq, fk[:, :, -Q:], vl[:, :, -Q:], normalize=True, eps=self.eps,
                                          initial_state=self.initial_state, return_state=True)
                out[:, idx] = o
                if self.keep_state:
                    self.final_state = state
            elif Q == vl.shape[2]:
                out[:, idx] = linear_attention(fq, fk, vl, normalize=True, eps=self.eps).float()
                if self.keep_state:
                    self.final_state = (torch.matmul(fk.float().transpose(-1, -2), vl), fk.float().sum(2))
            else:  # a few new queries over the keys of an ordinary KV cache: their rows explicitly
                out[:, idx] = torch.matmul(self.pattern(linear), vl)
        if self.softmax:
            soft = list(self.softmax)
            vs = v.index_select(1, self._group(soft, v.shape[1])).float()
            if vs.shape[2] != self.n_keys:
                raise ValueError(f"the softmax heads {soft} need the values of all {self.n_keys} keys, got "
                                 f"{vs.shape[2]}")
            out[:, soft] = torch.matmul(self.pattern(soft), vs)
        return out

    def state(self, v: torch.Tensor) -> torch.Tensor:
        """The linear heads' Hedgehog state Σ_j φ(k_j) v_jᵀ after the last key (what a `LinearizedCache` keeps).

        A decode step continues from its initial state (or returns its final one).

        Args:
            v: values `[B, G, S, D]` or `[B, H, S, D]`.

        Returns:
            float32 `[B, H, 2F, D]` (zero for softmax heads).
        """
        B, H, _, F2 = self.fq.shape
        out = torch.zeros(B, H, F2, v.shape[-1], dtype=torch.float32, device=v.device)
        linear = self.linear_heads
        if not linear:
            return out
        idx = torch.tensor(linear, device=v.device)
        if self.final_state is not None:
            out[:, idx] = self.final_state[0]
            return out
        vl = v.index_select(1, self._group(linear, v.shape[1])).float()
        fk = self.fk.index_select(1, idx).float()
        if self.past:
            Q = self.fq.shape[2]
            out[:, idx] = self.initial_state[0] + torch.matmul(fk[:, :, -Q:].transpose(-1, -2), vl[:, :, -Q:])
        else:
            out[:, idx] = torch.matmul(fk.transpose(-1, -2), vl)
        return out


def linearized_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: torch.Tensor | None, mixer: HybridMixer | None = None,
                                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The linearized layer's attention: the mixer's mixing of value `[B, G, S, D]`; returns `[B, Q, H, D]`.

    Args:
        module: the attention module.
        query: post-RoPE queries `[B, H, Q, D]` (used only by the sdpa fallback).
        key: keys `[B, G, S, D]` (likewise).
        value: values `[B, G, S, D]`.
        attention_mask: the model's 4-D mask (likewise).
        mixer: the layer's HybridMixer; None (every head softmax) falls back to sdpa.
        kwargs: passed to sdpa.

    Returns:
        (output `[B, Q, H, D]` in value's dtype, None: no attention weights).
    """
    if mixer is None:  # every head of the layer is softmax now (set_softmax_heads after wrapping): plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return mixer.forward(value).to(value.dtype).transpose(1, 2).contiguous(), None


def _key_mask(attention_mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """Real keys `[B, S]` from the model's mask (bool 4-D: a key is real if some query sees it; None: all)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        seen = attention_mask[:, 0].any(-2)
    else:
        seen = (attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2).any(-2)
    return seen.expand(batch, keys)


class LinearizedLlamaAttention(modeling_llama.LlamaAttention):
    """A Llama attention layer whose heads are Hedgehog linear attention, but for the config's softmax heads.

    Args:
        config: the model's HeadlabLinearizedConfig.
        layer_idx: the layer's index.
    """

    def __init__(self, config: HeadlabLinearizedConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        H = config.num_attention_heads
        self.num_heads = H
        self.feature_map = nn.Parameter(torch.zeros(H, self.head_dim, config.feature_dim))
        self.feature_bias = nn.Parameter(torch.zeros(H, config.feature_dim))
        self.softmax_heads = tuple(config.softmax_heads[layer_idx])
        self.kind = "softmax" if len(self.softmax_heads) == H else "hedgehog"

    def reset_feature_maps(self) -> None:
        """The identity map (softmax(±x) on the first min(D, F) coordinates), Hedgehog's starting point."""
        with torch.no_grad():
            self.feature_map.zero_()
            n = min(self.head_dim, self.feature_map.shape[-1])
            self.feature_map[:, range(n), range(n)] = 1.0
            self.feature_bias.zero_()

    def headlab_backend(self, backend: str) -> Callable | None:
        """What headlab's seam calls as this module's backend: its own form.

        Plain sdpa runs when no mixer comes (every head softmax), so `set_softmax_heads` after wrapping keeps working.

        Args:
            backend: the backend headlab chose ("sdpa" / "eager"), ignored.

        Returns:
            `linearized_attention_forward`.
        """
        return linearized_attention_forward

    def features(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """φ_h of post-RoPE queries `[B, H, T, D]` or keys `[B, G, T, D]` (repeated to the H query heads).

        Args:
            x: queries `[B, H, T, D]` or keys `[B, G, T, D]`.
            key_mask: bool `[B, T]`, True = real (padded keys get zero features).

        Returns:
            float32 `[B, H, T, 2F]`, zero for softmax heads.
        """
        H = self.num_heads
        if x.shape[1] != H:
            x = x.repeat_interleave(H // x.shape[1], dim=1)
        f = hedgehog_features(x, self.feature_map, self.feature_bias)
        if key_mask is not None:
            f = f * key_mask[:, None, :, None].to(f.dtype)
        if self.softmax_heads:
            f = f.index_fill(1, torch.tensor(self.softmax_heads, device=f.device), 0.0)
        return f

    def mixer(self, q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None) -> HybridMixer:
        """The layer's HybridMixer for a full forward, or Q new queries over the S keys of an ordinary KV cache.

        Args:
            q: post-RoPE queries `[B, H, Q, D]`.
            k: post-RoPE keys `[B, G, S, D]`.
            attention_mask: the model's 4-D mask (gives the real keys), or None.

        Returns:
            The HybridMixer.
        """
        key_mask = _key_mask(attention_mask, q.shape[0], k.shape[2])
        return HybridMixer(kind="hedgehog", fq=self.features(q), fk=self.features(k, key_mask), q=q, k=k,
                           softmax=self.softmax_heads, scale=self.scaling, eps=self.config.linear_eps,
                           key_mask=key_mask)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                mixer: HybridMixer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention call (through headlab's seam under attn_implementation "headlab") and the output projection."""
        impl = self.config._attn_implementation or "sdpa"
        fn = (ALL_ATTENTION_FUNCTIONS.get_interface(impl, linearized_attention_forward) if impl == "headlab"
              else linearized_attention_forward)
        out, weights = fn(self, q, k, v, mask, mixer=mixer, scaling=self.scaling, dropout=0.0)
        out = out.reshape(q.shape[0], q.shape[2], -1).contiguous()
        return self.o_proj(out), weights

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's attention: softmax heads as Llama, linear heads by Hedgehog, through headlab's seam.

        Args:
            hidden_states: the layer input `[B, T, d]`.
            position_embeddings: RoPE (cos, sin).
            attention_mask: the model's 4-D mask, or None.
            past_key_values: the cache under its pre-5.x name.
            cache: a `LinearizedCache` (recurrent decoding), an ordinary KV cache, or None.
            kwargs: passed on to the attention call.

        Returns:
            (output `[B, T, d]`, attention weights or None).
        """
        cache = cache if cache is not None else past_key_values
        recurrent = isinstance(cache, LinearizedCache)
        if self.kind == "softmax":
            if recurrent:  # plain Llama attention; the cache's `update` keeps the keys and values
                cache.begin_layer(self.layer_idx, self.softmax_heads, hidden_states.shape[1])
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        if recurrent:
            return self._forward_recurrent(q, k, v, attention_mask, cache)
        if cache is not None:  # an ordinary KV cache: each new row recomputed over every cached key (O(T) per token)
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        return self._attend(q, k, v, attention_mask, self.mixer(q, k, attention_mask))

    def _forward_recurrent(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           attention_mask: torch.Tensor | None, cache: LinearizedCache
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A forward on a `LinearizedCache`: the prefill (an empty cache) as a full forward, keeping the linear heads'
        state; a decode step of Q tokens continues it (O(1) in the cached length) and attends with the softmax heads
        over their cached keys and values. Both go through the seam with the layer's HybridMixer."""
        B, _, Q, _ = q.shape
        past = cache.begin_layer(self.layer_idx, self.softmax_heads, Q)
        entry = cache.layers[self.layer_idx]
        total = past + Q
        if attention_mask is not None and attention_mask.shape[-1] != total:
            raise ValueError(f"layer {self.layer_idx} got a mask over {attention_mask.shape[-1]} keys, not the "
                             f"{total} cached and new tokens")
        key_mask = _key_mask(attention_mask, B, total)  # [B, past + Q] real keys, or None
        fq = self.features(q)
        fk = self.features(k, key_mask[:, past:] if key_mask is not None else None)
        keep_kv = bool(self.softmax_heads) or entry.keep_keys  # softmax heads attend over every key
        keys, values, mask = k, v, attention_mask
        if past:
            if entry.state is None or (keep_kv and entry.keys is None):
                raise RuntimeError(f"layer {self.layer_idx} has no cached state after {past} tokens: the cache is not "
                                   "this model's (or was reset); start from a new cache")
            if keep_kv:
                keys, values = torch.cat([entry.keys, k], dim=2), torch.cat([entry.values, v], dim=2)
            if mask is None and self.config._attn_implementation == "headlab":
                # the seam's record: the new queries see every token so far (also where k, v hold the new ones only)
                pos = torch.arange(total, device=q.device)
                mask = (pos[None, :] <= pos[past:, None])[None, None]
        mixer = HybridMixer(kind="hedgehog", fq=fq, fk=fk, q=q, k=keys, softmax=self.softmax_heads,
                            scale=self.scaling, eps=self.config.linear_eps, key_mask=key_mask, past=past,
                            weight=self.feature_map, bias=self.feature_bias,
                            initial_state=entry.state if past else None, keep_state=True)
        out = self._attend(q, keys, values, mask, mixer)
        if mixer.final_state is None:
            raise RuntimeError(f"layer {self.layer_idx}'s attention call did not run its mixer's forward, so the cache "
                               "has no state to keep")
        entry.state = mixer.final_state
        if keep_kv:
            entry.keys, entry.values = keys, values
        entry.length = total
        return out


class HeadlabLinearizedForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with `LinearizedLlamaAttention` layers (see the module doc).

    Args:
        config: a HeadlabLinearizedConfig (feature maps start as the identity map).
    """

    config_class = HeadlabLinearizedConfig

    def __init__(self, config: HeadlabLinearizedConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            old = layer.self_attn
            new = LinearizedLlamaAttention(config, i)
            new.load_state_dict(old.state_dict(), strict=False)
            new.reset_feature_maps()
            layer.self_attn = new

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> Any:
        """LlamaForCausalLM's forward, with a `LinearizedCache` where Llama would make a DynamicCache.

        Pass a `transformers.DynamicCache` for the ordinary KV cache (each new row recomputed over the cached keys),
        none with use_cache unset for a plain forward.

        Args:
            input_ids: token ids `[B, T]`.
            attention_mask: `[B, T]` (1 = real).
            position_ids: positions `[B, T]`, or None.
            cache: a cache to continue (`past_key_values` is read too).
            inputs_embeds: embeddings instead of ids.
            labels: targets for the loss.
            use_cache: True without a cache makes a `LinearizedCache` (recurrent decoding).
            logits_to_keep: as LlamaForCausalLM.
            kwargs: passed to LlamaForCausalLM.forward.

        Returns:
            A CausalLMOutputWithPast (logits, loss with labels, the cache).
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if use_cache and cache is None:
            cache = LinearizedCache(self.config)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    def headlab_cache(self, *, keep_keys: bool = False) -> Any:
        """A fresh recurrent cache for this model.

        Args:
            keep_keys: also keep all-linear layers' keys, so that decode steps' pattern rows exist.

        Returns:
            A LinearizedCache.
        """
        from headlab.models.linearized_cache import LinearizedCache

        return LinearizedCache(self.config, keep_keys=keep_keys)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any,
                                      **kwargs: Any) -> Any:
        """generate decodes with a `LinearizedCache` unless given a cache, `use_cache=False` (the prefix rerun) or a
        `cache_implementation` (e.g. "dynamic": the ordinary KV cache)."""
        if (model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False and generation_config.cache_implementation is None):
            model_kwargs["cache"] = LinearizedCache(self.config)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def set_softmax_heads(self, softmax_heads: list[list[int]]) -> None:
        """Choose which heads are softmax (a hybrid), keeping every trained feature map.

        Args:
            softmax_heads: per layer, the query heads kept as softmax attention.

        Raises:
            ValueError: not one row per layer, or heads out of range.
        """
        cfg = HeadlabLinearizedConfig(**{**self.config.to_dict(), "softmax_heads": softmax_heads})
        self.config.softmax_heads = cfg.softmax_heads
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            attn.softmax_heads = tuple(cfg.softmax_heads[i])
            attn.kind = "softmax" if len(attn.softmax_heads) == attn.num_heads else "hedgehog"


def from_base(base: LlamaForCausalLM, *, feature_dim: int = 64, softmax_heads: list[list[int]] | None = None,
              base_model: str = "") -> HeadlabLinearizedForCausalLM:
    """A linearized copy of a Llama-family model (identity feature maps, to be trained by attention transfer).

    Args:
        base: a Llama-family transformers model.
        feature_dim: width F of each head's feature map per sign.
        softmax_heads: per layer, the heads kept as softmax (None: every head linear).
        base_model: a note of where the base came from.

    Returns:
        A HeadlabLinearizedForCausalLM in eval mode holding the base's weights.

    Raises:
        ValueError: base weights that do not fit the linearized model.
    """
    cfg = base.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_attn_implementation_autoset"):
        cfg.pop(key, None)
    config = HeadlabLinearizedConfig(feature_dim=feature_dim, softmax_heads=softmax_heads, base_model=base_model,
                                     **cfg)
    model = HeadlabLinearizedForCausalLM(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    extra = [m for m in missing if not m.endswith(("feature_map", "feature_bias"))]
    if extra or unexpected:
        raise ValueError(f"the base model's weights do not fit: missing {extra[:4]}, unexpected {unexpected[:4]}")
    for layer in model.model.layers:
        layer.self_attn.reset_feature_maps()
    return model.eval()


AutoConfig.register(HeadlabLinearizedConfig.model_type, HeadlabLinearizedConfig, exist_ok=True)
AutoModelForCausalLM.register(HeadlabLinearizedConfig, HeadlabLinearizedForCausalLM, exist_ok=True)
