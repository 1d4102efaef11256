"""headlab's linear-attention causal LMs: an HF `PreTrainedModel` with a mixer kind per layer.

Every layer has one attention module, `HeadlabLinearAttention`, whatever its kind, with q/k/v/o
projections of H heads. Softmax and sliding-window layers call transformers' attention interface like
any HF model (so headlab's seam captures their q, k, v). Linear layers build a `LinearMixer` (feature
maps, decays, β) and call `linear_attention_forward`, or, when the model runs under headlab
(`attn_implementation="headlab"`), the same seam with the mixer attached: captures then record it and
patterns and edits use the layer's implicit pattern.

Positions (config.position) are learned absolute embeddings shared by all kinds, so models that differ only in
their mixers can be compared; or none (the linear kinds carry order themselves); or RoPE on the q/k of the softmax
layers (`apply_rotary`; linear layers get no rotation).
Generation decodes recurrently with a `HeadlabLinearCache` (cache.py): per layer the linear kinds' state, swa's last
window − 1 keys / values, softmax's full K/V; a decode step costs O(1) per token in a linear layer and still goes through
the seam (`use_cache=False` reruns the whole prefix every step instead, the same tokens).

Short convolutions (config.short_conv = K > 0; conv.py): every layer convolves its q, k, v projections causally over the
last K tokens (depthwise, no bias, SiLU) before feature maps and RoPE, so the seam records the q, k, v the layer mixes.

Mixture-of-Head layers (config.moh_active_heads > 0; Jin et al. 2024): softmax layers whose heads are experts gated
per token, output = Σ_i g_i H_i W_O^i. The layer computes its gates from its input (`HeadlabLinearAttention.route`)
and multiplies the heads' outputs by them itself, after the attention function, so any attention implementation
gives the same model; under headlab's seam it also hands them over as `gates=` (recorded as LayerRecord.gates;
head edits act on the head outputs before these gates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from headlab.models.linear.cache import HeadlabLinearCache
from headlab.models.linear.config import LINEAR_KINDS, SOFTMAX_KINDS, HeadlabLinearConfig
from headlab.models.linear.conv import ShortConv, convolve_qkv
from headlab.models.linear.mixer import LinearMixer


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention (bool or additive mask); returns `[B, Q, H, D]` and the weights."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def linear_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, mixer: LinearMixer | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A linear layer's mixing of `value` `[B, H, S, D]` by its mixer; returns `[B, Q, H, D]` and no weights."""
    if mixer is None:
        raise ValueError(f"{type(module).__name__} is a linear layer: its attention needs the layer's mixer")
    return mixer.forward(value).to(value.dtype).transpose(1, 2).contiguous(), None


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """BASED's 2nd-order Taylor map: φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) (≈ exp(q·k/√d)); `[..., 1 + d + d²]`."""
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2 ** 0.5 * d ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE (Su et al. 2021, GPT-NeoX's half-split layout) of x `[B, H, T, D]` (D even) at `positions` `[T]` or `[B, T]`.

    Dimension pairs (i, i + D/2) turn by positions · theta^(−2i/D), so rotated q·k depends on the positions' difference
    only. Computed in float32, returned in x's dtype.
    """
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * inv_freq  # [(B,) T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, T, D]
    xf = x.float()
    rotated = torch.cat([-xf[..., D // 2:], xf[..., : D // 2]], dim=-1)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


@dataclass
class MoHRouting:
    """One MoH layer's routing of a batch (`HeadlabLinearAttention.route`).

    Attributes:
        gates: `[B, T, H]` the gates g_i multiplying each head's output (shared heads first, then routed; 0 = off).
        probs: `[B, T, h_r]` softmax(W_r x) over the routed heads (before the top-K), float32.
        selected: bool `[B, T, h_r]`, True for each token's top-K routed heads.
        shares: `[B, T, 2]` [α1, α2] = softmax(W_h x) (float32), or None without shared heads.
        balance: the load-balance loss L_b = h_r · Σ_i P_i f_i over the batch's real tokens (P_i: mean of probs[..., i],
            f_i: fraction of tokens selecting head i); K at perfect balance (P_i = 1/h_r, f_i = K/h_r).
    """

    gates: torch.Tensor
    probs: torch.Tensor
    selected: torch.Tensor
    shares: torch.Tensor | None
    balance: torch.Tensor


def balance_loss(probs: torch.Tensor, selected: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoH's load-balance loss h_r · Σ_i P_i f_i over the real tokens (`key_mask` `[B, T]`, True = real; None: all).

    P_i is the mean routing probability of routed head i and f_i the fraction of tokens whose top-K holds it
    (MoH's code: `mean(me * ce) * E * E` with E = h_r experts). Padding counts in neither.
    """
    w = torch.ones(probs.shape[:-1], dtype=torch.float32, device=probs.device) if key_mask is None \
        else key_mask.to(torch.float32)
    n = w.sum().clamp_min(1.0)
    p_mean = (probs.float() * w[..., None]).flatten(0, -2).sum(0) / n
    f = (selected.float() * w[..., None]).flatten(0, -2).sum(0) / n
    return probs.shape[-1] * (p_mean * f).sum()


class HeadlabLinearAttention(nn.Module):
    """One layer's sequence mixer: H heads of the layer's kind (see `HeadlabLinearConfig`).

    With `config.moh_active_heads` = K > 0 it is a Mixture-of-Head layer with routers `router_r` (W_r: hidden → h_r),
    and with h_s shared heads `router_h` (W_h: hidden → 2) and, for h_s > 1, `router_s` (W_s: hidden → h_s; one shared
    head's softmax is the constant 1, so it has none). Bias-free, as MoH's code. See `route`.
    """

    def __init__(self, config: HeadlabLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds[layer_idx]
        self.num_heads = H = config.num_attention_heads
        self.head_dim = D = config.head_dim
        self.qk_dim = Dqk = config.based_feature_dim if self.kind == "based" else D
        self.scaling = Dqk ** -0.5
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, H * Dqk, bias=False)
        self.k_proj = nn.Linear(hidden, H * Dqk, bias=False)
        self.v_proj = nn.Linear(hidden, H * D, bias=False)
        self.o_proj = nn.Linear(H * D, hidden, bias=False)
        self.short_conv = int(getattr(config, "short_conv", 0))
        if self.short_conv:  # causal depthwise convolutions of q, k, v (conv.py)
            self.q_conv, self.k_conv = ShortConv(H * Dqk, self.short_conv), ShortConv(H * Dqk, self.short_conv)
            self.v_conv = ShortConv(H * D, self.short_conv)
        if self.kind == "hedgehog":
            self.feature_map = nn.Parameter(torch.zeros(H, D, config.hedgehog_feature_dim))
            self.feature_bias = nn.Parameter(torch.zeros(H, config.hedgehog_feature_dim))
        elif self.kind == "gla":
            self.gate = nn.Sequential(nn.Linear(hidden, config.gla_gate_rank, bias=False),
                                      nn.Linear(config.gla_gate_rank, H * D, bias=True))
        elif self.kind == "deltanet":
            self.b_proj = nn.Linear(hidden, H, bias=True)
        self.moh = bool(getattr(config, "moh_active_heads", 0))
        self.moh_balance: torch.Tensor | None = None
        if self.moh:
            self.moh_shared = config.moh_shared_heads
            self.moh_active = config.moh_active_heads
            self.moh_routed = H - self.moh_shared
            self.router_r = nn.Linear(hidden, self.moh_routed, bias=False)
            if self.moh_shared:
                self.router_h = nn.Linear(hidden, 2, bias=False)
            if self.moh_shared > 1:
                self.router_s = nn.Linear(hidden, self.moh_shared, bias=False)

    def route(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> MoHRouting:
        """The MoH gates of this layer for its input x `[B, T, C]` (token by token: position t sees only x[:, t]).

        As MoH's code (github SkyworkAI/MoH, MoH-ViT / MoH-DiT attention), with p = softmax(W_r x) over the h_r
        routed heads and [α1, α2] = softmax(W_h x):

        - routed head i: g_i = 2·α2 · K · p_i / Σ_{j∈topK} p_j if i is in the token's top-K, else 0 (renormalised over
          the chosen K, then ×K: the routed gates sum to 2·α2·K);
        - shared head i: g_i = 2·α1 · h_s · softmax(W_s x)_i (they sum to 2·α1·h_s; one shared head: 2·α1);
        - no shared heads: g_i is the routed gate without the 2·α2 factor.

        With all weights of the routers zero every gate of an active head is exactly 1 (plain MHA); with K = h_r no
        head is ever off. `key_mask` (True = real token) keeps padding out of the balance loss.
        """
        if not self.moh:
            raise ValueError(f"layer {self.layer_idx} is not a Mixture-of-Head layer (config.moh_active_heads is 0)")
        probs = torch.softmax(self.router_r(x).float(), dim=-1)  # [B, T, h_r]
        top = probs.topk(self.moh_active, dim=-1).indices
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
        routed = probs * selected
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(routed.dtype).eps) * self.moh_active
        shares = None
        if self.moh_shared:
            shares = torch.softmax(self.router_h(x).float(), dim=-1)
            if self.moh_shared > 1:
                shared = torch.softmax(self.router_s(x).float(), dim=-1) * self.moh_shared
            else:
                shared = torch.ones_like(probs[..., :1])
            gates = torch.cat([shared * (2 * shares[..., :1]), routed * (2 * shares[..., 1:])], dim=-1)
        else:
            gates = routed
        return MoHRouting(gates=gates.to(x.dtype), probs=probs, selected=selected, shares=shares,
                          balance=balance_loss(probs, selected, key_mask))

    def headlab_backend(self, backend: str) -> Callable | None:
        """The function headlab's seam calls as this module's backend (None: the standard sdpa/eager one)."""
        if self.kind in LINEAR_KINDS:
            return linear_attention_forward
        return eager_attention_forward if backend == "eager" else None

    def mixer(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> LinearMixer:
        """The feature maps / decays / β of a linear layer, from its input x `[B, T, C]` and q, k `[B, H, T, ·]`."""
        B, T, _ = x.shape
        H = self.num_heads
        if self.kind == "linear":
            fq, fk = F.elu(q) + 1, F.elu(k) + 1
        elif self.kind == "hedgehog":
            def phi(t: torch.Tensor) -> torch.Tensor:
                h = torch.einsum("bhtd,hdf->bhtf", t, self.feature_map) + self.feature_bias[None, :, None]
                return torch.cat([torch.softmax(h, -1), torch.softmax(-h, -1)], dim=-1)
            fq, fk = phi(q), phi(k)
        elif self.kind == "based":
            fq, fk = taylor_features(q), taylor_features(k)
        elif self.kind == "gla":
            fq, fk = q * self.scaling, k
        elif self.kind == "deltanet":
            fq, fk = _l2norm(F.silu(q)) * self.scaling, _l2norm(F.silu(k))
        else:
            raise ValueError(f"{self.kind!r} is not a linear kind")
        g = beta = None
        if self.kind == "gla":
            g = F.logsigmoid(self.gate(x)).view(B, T, H, self.head_dim).transpose(1, 2) / self.config.gla_gate_normalizer
        if self.kind == "deltanet":
            beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, T]
        if key_mask is not None:  # padded keys write nothing (right padding never reaches a real query anyway)
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        return LinearMixer(kind=self.kind, fq=fq, fk=fk, g=g, beta=beta, eps=self.config.linear_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output `[B, T, C]`, softmax weights or None). A MoH layer keeps its batch's load-balance loss in
        `self.moh_balance` (None otherwise), which `HeadlabLinearModel` collects after each layer.

        kwarg `cache` (a `HeadlabLinearCache` inside a model forward that began a step on it): prefill fills this
        layer's entry, a decode step continues from it (the T tokens then come after the cached ones)."""
        B, T, _ = hidden_states.shape
        H = self.num_heads
        cache: HeadlabLinearCache | None = kwargs.get("cache")
        routing = self.route(hidden_states, key_mask) if self.moh else None
        self.moh_balance = routing.balance if routing is not None else None
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.short_conv:  # before feature maps / RoPE / the seam: everything downstream sees the convolved q, k, v
            q, k, v = convolve_qkv(self, q, k, v, key_mask, cache)
        q = q.view(B, T, H, self.qk_dim).transpose(1, 2)
        k = k.view(B, T, H, self.qk_dim).transpose(1, 2)
        v = v.view(B, T, H, self.head_dim).transpose(1, 2)
        if self.kind in SOFTMAX_KINDS and getattr(self.config, "position", "learned") == "rotary":
            # RoPE on softmax layers only (the seam sees the rotated q, k); kwarg position_ids `[T]` / `[B, T]`,
            # default 0..T-1
            pos = kwargs.get("position_ids")
            pos = torch.arange(T, device=q.device) if pos is None else pos
            q, k = apply_rotary(q, pos, self.config.rope_theta), apply_rotary(k, pos, self.config.rope_theta)
        impl = self.config._attn_implementation or "sdpa"
        if self.kind in SOFTMAX_KINDS:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
            # headlab's seam records a MoH layer's gates (and pops them: the layer applies them below)
            extra = {"gates": routing.gates} if routing is not None and impl == "headlab" else {}
            if cache is not None:  # prefill keeps K/V; a decode step attends over the cached ones too
                k, v, attention_mask = cache.softmax_step(self.layer_idx, k, v, attention_mask)
            out, weights = fn(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **extra)
        else:
            mixer = self.mixer(hidden_states, q, k, key_mask)
            if cache is not None:  # prefill keeps the final state; a decode step continues from the cached one
                mixer, k, v, attention_mask = cache.linear_step(self.layer_idx, mixer, k, v, attention_mask)
            # only headlab's seam knows mixers: any other implementation runs the layer's own form
            fn = (ALL_ATTENTION_FUNCTIONS.get_interface(impl, linear_attention_forward) if impl == "headlab"
                  else linear_attention_forward)
            out, weights = fn(self, q, k, v, attention_mask, mixer=mixer, scaling=self.scaling)
            if cache is not None:
                cache.linear_done(self.layer_idx, mixer)
        if routing is not None:  # Σ_i g_i H_i W_O^i
            out = out * routing.gates.to(out.dtype)[..., None]
        return self.o_proj(out.reshape(B, T, H * self.head_dim)), weights


@dataclass
class HeadlabLinearModelOutput(BaseModelOutput):
    """BaseModelOutput plus `moh_balance`: the mean over MoH layers of their load-balance loss L_b (None without MoH),
    and `cache`: the `HeadlabLinearCache` when the forward used one."""

    moh_balance: torch.FloatTensor | None = None
    cache: HeadlabLinearCache | None = None


@dataclass
class HeadlabLinearCausalLMOutput(CausalLMOutput):
    """CausalLMOutput plus `moh_balance` (mean over MoH layers of L_b, unweighted; None without MoH). With labels,
    `loss` = cross-entropy + config.moh_balance_coef · moh_balance. `cache`: the `HeadlabLinearCache` when the forward
    used one (generate reads it from here)."""

    moh_balance: torch.FloatTensor | None = None
    cache: HeadlabLinearCache | None = None


class HeadlabLinearMLP(nn.Module):
    def __init__(self, config: HeadlabLinearConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class HeadlabLinearBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)) when the config has an MLP."""

    def __init__(self, config: HeadlabLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = HeadlabLinearAttention(config, layer_idx)
        self.mlp = None
        if config.intermediate_size:
            self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.mlp = HeadlabLinearMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), attention_mask=mask, key_mask=key_mask, **kwargs)[0]
        if self.mlp is not None:
            x = x + self.mlp(self.ln_mlp(x))
        return x


class HeadlabLinearPreTrainedModel(PreTrainedModel):
    config_class = HeadlabLinearConfig
    base_model_prefix = "model"
    _no_split_modules = ["HeadlabLinearBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ShortConv):
            module.reset_parameters()
        elif isinstance(module, HeadlabLinearAttention) and module.kind == "hedgehog":
            with torch.no_grad():  # the identity map: softmax(±x) features at the start
                module.feature_map.zero_()
                n = min(module.head_dim, module.feature_map.shape[-1])
                module.feature_map[:, range(n), range(n)] = 1.0
                module.feature_bias.zero_()


def causal_masks(attention_mask: torch.Tensor | None, batch: int, length: int, window: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[B, 1, T, T]` masks (True = may attend): causal ∧ real key, and the same within the window.

    Each query always sees itself, so a padded query's row is never empty (sdpa would give NaN there).
    """
    i = torch.arange(length, device=device)
    causal = i[None, :] <= i[:, None]
    diag = i[None, :] == i[:, None]
    local = causal & (i[:, None] - i[None, :] < window)
    if attention_mask is None:
        return causal[None, None].expand(batch, 1, -1, -1), local[None, None].expand(batch, 1, -1, -1)
    real = attention_mask.bool()[:, None, None, :]
    return (causal & real) | diag, (local & real) | diag


class HeadlabLinearModel(HeadlabLinearPreTrainedModel):
    def __init__(self, config: HeadlabLinearConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # learned absolute positions only with position "learned" (None otherwise: "none" / "rotary" add nothing here)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position == "learned" else None)
        self.layers = nn.ModuleList(HeadlabLinearBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                cache: HeadlabLinearCache | None = None, use_cache: bool | None = None,
                past_key_values: HeadlabLinearCache | None = None, **kwargs: Any) -> HeadlabLinearModelOutput:
        """The final hidden states; with a cache (`cache`, or `past_key_values`) or `use_cache=True` (a new cache),
        the T tokens come after the cache's and the cache then holds them too (returned as `output.cache`).

        `use_cache`: None uses a cache when one is given; False ignores any (a full forward from position 0).
        `attention_mask` with a cache: `[B, cached + T]` (as `generate` passes it) or `[B, T]`.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = HeadlabLinearCache(self.config)
        if cache is not None and not isinstance(cache, HeadlabLinearCache):
            raise TypeError(f"{type(self).__name__} decodes with a HeadlabLinearCache, not a {type(cache).__name__}: "
                            "pass none (use_cache=True makes one) or HeadlabLinearCache(model.config)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if self.embed_positions is not None and T > self.config.max_position_embeddings:
            raise ValueError(f"input of {T} tokens is longer than the model's {self.config.max_position_embeddings} "
                             "learned positions")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, T] (1 = real token); got shape {tuple(attention_mask.shape)}")
        past, layer_kwargs = 0, {}
        if cache is not None:  # the new tokens come after the `past` cached ones (attention_mask: now theirs)
            limit = self.config.max_position_embeddings if getattr(self, "embed_positions", None) is not None else None
            past, attention_mask = cache.begin(T, attention_mask, limit)
            layer_kwargs = {"cache": cache, "position_ids": torch.arange(past, past + T, device=x.device)}
        if self.embed_positions is not None:
            x = x + self.embed_positions(torch.arange(past, past + T, device=x.device))[None]
        full, local = causal_masks(attention_mask, B, T, self.config.window, x.device)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        hidden = [x] if output_hidden_states else None
        balances = []
        for layer in self.layers:
            x = layer(x, local if layer.attn.kind == "swa" else full, key_mask, **layer_kwargs)
            if layer.attn.moh:
                balances.append(layer.attn.moh_balance)
                layer.attn.moh_balance = layer.attn.moh_balance.detach()  # the module keeps no autograd graph
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.end()
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        # MoH's training code averages the layers' L_b (sum / number of MoH layers)
        balance = torch.stack(balances).mean() if balances else None
        return HeadlabLinearModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None,
                                        moh_balance=balance, cache=cache)


class HeadlabLinearForCausalLM(HeadlabLinearPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HeadlabLinearConfig) -> None:
        super().__init__(config)
        self.model = HeadlabLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                output_hidden_states: bool | None = None, cache: HeadlabLinearCache | None = None,
                use_cache: bool | None = None, past_key_values: HeadlabLinearCache | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> HeadlabLinearCausalLMOutput:
        """Logits (and the LM loss with labels). `cache` / `past_key_values` / `use_cache` as in `HeadlabLinearModel`
        (the cache comes back as `output.cache`); `logits_to_keep` = n > 0 computes the last n positions' logits only
        (without labels)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, cache=cache, use_cache=use_cache,
                         past_key_values=past_key_values, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep and labels is None else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            if out.moh_balance is not None:
                loss = loss + self.config.moh_balance_coef * out.moh_balance
        return HeadlabLinearCausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                           moh_balance=out.moh_balance, cache=out.cache)

    def headlab_cache(self, *, keep_keys: bool = False) -> Any:
        """A fresh recurrent-state cache for this model (`keep_keys`: also keep linear layers' keys for patterns)."""
        from headlab.models.linear.cache import HeadlabLinearCache

        return HeadlabLinearCache(self.config, keep_keys=keep_keys)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate must not make a DynamicCache: the model makes its own `HeadlabLinearCache` (use_cache=True)."""
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: HeadlabLinearCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      past_key_values: HeadlabLinearCache | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """With a cache (use_cache, generate's default) only the new tokens go in: the prefill makes the cache, each
        step then feeds one token; with use_cache=False every step reruns the whole prefix (the same tokens)."""
        cache = cache if cache is not None else past_key_values
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if use_cache is False:
            return inputs
        if cache is not None and next_sequence_length is not None:
            inputs["input_ids"] = input_ids[:, -next_sequence_length:]
        inputs.update(cache=cache, use_cache=True)
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
