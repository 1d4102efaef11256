"""The linear sequence mixers of headlab's linear-attention LMs, and their implicit attention patterns.

A `LinearMixer` holds what one linear layer computed from its input before mixing: the feature-mapped
queries and keys, and GLA's log decays or DeltaNet's β. `forward(v)` is the layer's own computation (the
chunked kernels of `headlab_kernels.linear_attention`); `pattern()` is the `[B, H, Q, S]` matrix that the layer
applies to v, so that `pattern @ v == forward(v)` (tested for every kind):

- linear / hedgehog / based: A_ij = φ(q_i)·φ(k_j) / (Σ_{l≤i} φ(q_i)·φ(k_l) + ε), j ≤ i (rows sum to 1 − O(ε));
- gla: A_ij = Σ_f q_if k_jf Π_{t=j+1..i} α_tf, j ≤ i (the decayed q·k; no normalisation);
- deltanet: A = tril(Q Kᵀ) (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β) (the delta rule unrolled; signed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab_kernels.linear_attention import (
    delta_attention,
    delta_pattern,
    gla_attention,
    gla_pattern,
    linear_attention,
    linear_pattern,
)
from headlab_kernels.linear_attention.reference import delta_chunked, gla_chunked, linear_chunked

NORMALISED = frozenset({"linear", "hedgehog", "based"})


@dataclass
class LinearMixer:
    """One linear layer's mixing inputs (all `[B, H, ·]`, float as computed by the layer).

    Attributes:
        kind: "linear", "hedgehog", "based", "gla" or "deltanet".
        fq: feature-mapped (and scaled) queries `[B, H, Q, F]`.
        fk: feature-mapped keys `[B, H, S, F]` (zero at padded keys).
        g: GLA's log decays `[B, H, S, F]` (≤ 0), else None.
        beta: DeltaNet's write strengths `[B, H, S]` in (0, 1), else None.
        eps: ε of the normalised forms.
        impl: kernel implementation ("auto": Triton on CUDA, the torch chunked form elsewhere).
    """

    kind: str
    fq: torch.Tensor
    fk: torch.Tensor
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    eps: float = 1e-6
    impl: str = "auto"

    @property
    def normalised(self) -> bool:
        """Whether the rows of the pattern are normalised weights (sum 1, non-negative)."""
        return self.kind in NORMALISED

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The layer's mixing of values `[B, H, S, D]` → `[B, H, Q, D]` (float32)."""
        if self.kind in NORMALISED:
            return linear_attention(self.fq, self.fk, v, normalize=True, eps=self.eps, impl=self.impl)
        if self.kind == "gla":
            # on CPU the torch form's intra-chunk [n, n, F] decay product is cheapest with short chunks
            return gla_attention(self.fq, self.fk, v, self.g, impl=self.impl, chunk=None if v.is_cuda else 8)
        if self.kind == "deltanet":
            return delta_attention(self.fq, self.fk, v, self.beta, impl=self.impl)
        raise ValueError(f"unknown linear kind {self.kind!r}")

    def pattern(self, heads: list[int] | None = None, rows: slice | None = None) -> torch.Tensor:
        """The implicit pattern `[B, h, Q, S]` (float32) of the given heads (all when None), optionally of some query rows."""
        idx = None if heads is None else torch.as_tensor(list(heads), device=self.fq.device)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or idx is None else t.index_select(1, idx)

        fq, fk = pick(self.fq), pick(self.fk)
        if self.kind in NORMALISED:
            return linear_pattern(fq, fk, normalize=True, eps=self.eps, rows=rows)
        if self.kind == "gla":
            return gla_pattern(fq, fk, pick(self.g), rows=rows)
        if self.kind == "deltanet":
            return delta_pattern(fq, fk, pick(self.beta), rows=rows)
        raise ValueError(f"unknown linear kind {self.kind!r}")

    def state(self, v: torch.Tensor) -> torch.Tensor:
        """The recurrent state after the last key, `[B, H, F, D]` (what a linear layer keeps instead of a KV cache).

        linear kinds: Σ_j φ(k_j) v_jᵀ; gla: Σ_j diag(Π_{t>j} α_t) k_j v_jᵀ; deltanet: the delta-rule state
        (transposed to `[F, D]`).
        """
        if self.kind in NORMALISED:
            return linear_chunked(self.fq, self.fk, v, normalize=True, eps=self.eps, return_state=True)[1][0]
        if self.kind == "gla":
            return gla_chunked(self.fq, self.fk, v, self.g, chunk=16, return_state=True)[1]
        if self.kind == "deltanet":
            return delta_chunked(self.fq, self.fk, v, self.beta, return_state=True)[1].transpose(-1, -2)
        raise ValueError(f"unknown linear kind {self.kind!r}")
