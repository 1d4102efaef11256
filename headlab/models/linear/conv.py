"""Short causal depthwise convolutions on a layer's q, k and v projections (`HeadlabLinearConfig.short_conv` = K > 0).

As fla's `ShortConvolution` (GLA, DeltaNet) and the short convolutions of Zoology's / Mamba's mixers: each channel of
the projection x `[B, T, C]` is convolved causally over the last K tokens, y_t = SiLU(Σ_{i<K} w_{c,i} x_{t−K+1+i}),
with no bias (fla's default: bias=False, activation "silu"). A token then carries its predecessors' features into its
query, key and value, so binding a key to the value after it is a one-layer operation.

The layer applies it to its q, k, v projections before feature maps, RoPE and the attention call, so headlab's seam
records the convolved q, k, v (the ones the layer actually mixes). Padded positions are zeroed before the convolution
(`key_mask`), so padding never reaches a real token through it: a left-padded row sees zeros before its first token,
exactly as an unpadded row at position 0. A decode step continues from the last K − 1 (masked) inputs, which
`HeadlabLinearCache` keeps per layer (`HeadlabLinearLayerCache.conv`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """A causal depthwise Conv1d of kernel size K over `channels` channels, no bias, then SiLU.

    `weight` has nn.Conv1d's depthwise layout `[channels, 1, K]`; weight[c, 0, K − 1] multiplies the current token.
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"a short convolution needs kernel size >= 1, got {kernel}")
        self.channels, self.kernel = channels, kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv1d's default initialisation (uniform in ±1/√K for a depthwise kernel), as fla leaves it."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel={self.kernel}, bias=False, activation=silu"

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(SiLU(conv(x)) `[B, T, C]`, the last K − 1 inputs `[B, K − 1, C]`) for x `[B, T, C]` that follows `past`
        (the K − 1 inputs before it; None: zeros, the start of a sequence)."""
        B, T, C = x.shape
        if C != self.channels:
            raise ValueError(f"a short convolution over {self.channels} channels got an input of {C}")
        if past is None:
            past = x.new_zeros(B, self.kernel - 1, C)
        elif past.shape != (B, self.kernel - 1, C):
            raise ValueError(f"short convolution state of shape {tuple(past.shape)}: expected "
                             f"{(B, self.kernel - 1, C)} (the last kernel − 1 inputs of this batch)")
        full = torch.cat([past.to(x.dtype), x], dim=1)  # [B, K − 1 + T, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)
        # a copy: a view would keep the whole [B, K − 1 + T, C] input alive in a cache
        return F.silu(y), full[:, full.shape[1] - (self.kernel - 1):].clone()


def convolve_qkv(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_mask: torch.Tensor | None, cache=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's short convolutions (`module.q_conv`, `k_conv`, `v_conv`) on its projections q, k, v `[B, T, ·]`.

    `key_mask` `[B, T]` (True = real token; None: all real) zeroes the padded inputs first. With a
    `HeadlabLinearCache` in a forward, the inputs continue the cached ones (a decode step) and the cache keeps the
    last K − 1 of them for the next step.
    """
    if key_mask is not None:
        keep = key_mask[:, :, None].to(q.dtype)
        q, k, v = q * keep, k * keep, v * keep
    past = cache.conv_state(module.layer_idx) if cache is not None else None
    past = past if past is not None else (None, None, None)
    (q, sq), (k, sk), (v, sv) = (conv(x, p) for conv, x, p in
                                 zip((module.q_conv, module.k_conv, module.v_conv), (q, k, v), past))
    if cache is not None:
        cache.keep_conv_state(module.layer_idx, (sq, sk, sv))
    return q, k, v
