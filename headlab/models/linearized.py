"""A pretrained Llama-family model linearized head by head (Hedgehog feature maps), model_type "headlab_linearized".

Each attention layer keeps the base model's projections and RoPE; each of its query heads is either kept as softmax
attention or replaced by Hedgehog linear attention: φ_h(x) = [softmax(x W_h + b_h), softmax(−(x W_h + b_h))] on the
post-RoPE query and key, o_i = Σ_{j≤i} φ(q_i)·φ(k_j) v_j / (Σ_{j≤i} φ(q_i)·φ(k_j) + ε). Which heads stay softmax is
the config's `softmax_heads` (one list per layer), so one set of trained feature maps gives every hybrid, chosen
head by head. The feature maps are trained by attention transfer with the base weights frozen
(`headlab.linearize`).

Under headlab's seam a layer with linear heads passes a `HybridMixer`: its implicit pattern is the Hedgehog pattern
for linear heads and softmax(q·k) for softmax heads, and `pattern @ v` is the layer's output (tested). Decoding keeps
the ordinary KV cache and recomputes each new token's row from the cached keys (O(T) per token, like softmax
attention; a recurrent state would make it O(1)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from headlab_kernels.linear_attention import linear_attention


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
    """Hedgehog's map of `x` `[B, h, T, D]` with per-head `weight` `[h, D, F]`, `bias` `[h, F]`: `[B, h, T, 2F]`."""
    z = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float()) + bias.float()[None, :, None]
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1)


@dataclass
class HybridMixer:
    """One linearized layer's mixing inputs, for all H query heads (the seam's `mixer`).

    Attributes:
        kind: "hedgehog".
        fq, fk: feature-mapped queries `[B, H, Q, 2F]` and keys `[B, H, S, 2F]` (zero at padded keys; zero for
            softmax heads).
        q, k: post-RoPE queries `[B, H, Q, D]` and keys `[B, H, S, D]` (keys repeated per query head), read for
            softmax heads.
        softmax: the query heads kept as softmax attention.
        scale: softmax scale; eps: ε of the linear form; key_mask: bool `[B, S]` real keys (None: all).
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

    @property
    def normalised(self) -> bool:
        return True

    def _visible(self, rows: slice | None) -> torch.Tensor:
        Q, S = self.fq.shape[2], self.fk.shape[2]
        r = torch.arange(Q, device=self.fq.device)[rows if rows is not None else slice(None)] + (S - Q)
        vis = torch.arange(S, device=self.fq.device)[None, :] <= r[:, None]  # [n, S]
        vis = vis[None, None]
        if self.key_mask is not None:
            vis = vis & self.key_mask[:, None, None, :]
        return vis

    def pattern(self, heads: list[int] | None = None, rows: slice | None = None) -> torch.Tensor:
        """`[B, h, Q, S]` float32: Hedgehog's normalised weights for linear heads, softmax for softmax heads."""
        heads = list(range(self.fq.shape[1])) if heads is None else list(heads)
        sel = slice(None) if rows is None else rows
        vis = self._visible(rows)
        out = []
        for h in heads:
            if h in self.softmax:
                s = torch.matmul(self.q[:, h, sel].float(), self.k[:, h].float().transpose(-1, -2)) * self.scale
                s = s.masked_fill(~vis[:, 0], float("-inf"))
                p = torch.softmax(s, -1).nan_to_num(0.0)
            else:
                a = torch.matmul(self.fq[:, h, sel], self.fk[:, h].transpose(-1, -2)) * vis[:, 0]
                p = a / (a.sum(-1, keepdim=True) + self.eps)
            out.append(p)
        return torch.stack(out, dim=1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The layer's mixing of values `[B, H, S, D]` → `[B, H, Q, D]` (float32)."""
        Q, S = self.fq.shape[2], self.fk.shape[2]
        H = self.fq.shape[1]
        linear = [h for h in range(H) if h not in self.softmax]
        out = torch.zeros(v.shape[0], H, Q, v.shape[-1], dtype=torch.float32, device=v.device)
        if linear:
            if Q == S:
                idx = torch.tensor(linear, device=v.device)
                out[:, idx] = linear_attention(self.fq[:, idx], self.fk[:, idx], v[:, idx].float(), normalize=True,
                                               eps=self.eps).float()
            else:  # a few new queries over cached keys: their rows explicitly
                p = self.pattern(linear)
                out[:, linear] = torch.matmul(p, v[:, linear].float())
        if self.softmax:
            p = self.pattern(list(self.softmax))
            out[:, list(self.softmax)] = torch.matmul(p, v[:, list(self.softmax)].float())
        return out


def linearized_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: torch.Tensor | None, mixer: HybridMixer | None = None,
                                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The linearized layer's attention: the mixer's mixing of value `[B, G, S, D]`; returns `[B, Q, H, D]`."""
    if mixer is None:  # every head of the layer is softmax now (set_softmax_heads after wrapping): plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    return mixer.forward(v).to(value.dtype).transpose(1, 2).contiguous(), None


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
    """A Llama attention layer whose heads are Hedgehog linear attention, but for the config's softmax heads."""

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
        """What headlab's seam calls as this module's backend: its own form (plain sdpa when no mixer comes, i.e.
        every head is softmax — so `set_softmax_heads` after wrapping keeps working)."""
        return linearized_attention_forward

    def mixer(self, q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None) -> HybridMixer:
        """The layer's HybridMixer from post-RoPE q `[B, H, Q, D]`, k `[B, G, S, D]`."""
        H = q.shape[1]
        groups = H // k.shape[1]
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        fq = hedgehog_features(q, self.feature_map, self.feature_bias)
        fk = hedgehog_features(kk, self.feature_map, self.feature_bias)
        key_mask = _key_mask(attention_mask, q.shape[0], kk.shape[2])
        if key_mask is not None:
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        if self.softmax_heads:
            soft = torch.tensor(self.softmax_heads, device=q.device)
            fq = fq.index_fill(1, soft, 0.0)
            fk = fk.index_fill(1, soft, 0.0)
        return HybridMixer(kind="hedgehog", fq=fq, fk=fk, q=q, k=kk, softmax=self.softmax_heads,
                           scale=self.scaling, eps=self.config.linear_eps, key_mask=key_mask)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "softmax":
            return super().forward(hidden_states, position_embeddings, attention_mask,
                                   cache=cache if cache is not None else past_key_values, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        mixer = self.mixer(q, k, attention_mask)
        impl = self.config._attn_implementation or "sdpa"
        fn = (ALL_ATTENTION_FUNCTIONS.get_interface(impl, linearized_attention_forward) if impl == "headlab"
              else linearized_attention_forward)
        out, weights = fn(self, q, k, v, attention_mask, mixer=mixer, scaling=self.scaling, dropout=0.0)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class HeadlabLinearizedForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with `LinearizedLlamaAttention` layers (see the module doc)."""

    config_class = HeadlabLinearizedConfig

    def __init__(self, config: HeadlabLinearizedConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            old = layer.self_attn
            new = LinearizedLlamaAttention(config, i)
            new.load_state_dict(old.state_dict(), strict=False)
            new.reset_feature_maps()
            layer.self_attn = new

    def set_softmax_heads(self, softmax_heads: list[list[int]]) -> None:
        """Choose which heads are softmax (a hybrid), keeping every trained feature map."""
        cfg = HeadlabLinearizedConfig(**{**self.config.to_dict(), "softmax_heads": softmax_heads})
        self.config.softmax_heads = cfg.softmax_heads
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            attn.softmax_heads = tuple(cfg.softmax_heads[i])
            attn.kind = "softmax" if len(attn.softmax_heads) == attn.num_heads else "hedgehog"


def from_base(base: LlamaForCausalLM, *, feature_dim: int = 64, softmax_heads: list[list[int]] | None = None,
              base_model: str = "") -> HeadlabLinearizedForCausalLM:
    """A linearized copy of a Llama-family model (identity feature maps, to be trained by attention transfer)."""
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
