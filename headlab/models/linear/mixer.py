"""The linear sequence mixers of headlab's linear-attention LMs, and their implicit attention patterns.

A `LinearMixer` holds what one linear layer computed from its input before mixing: the feature-mapped
queries and keys, and GLA's log decays or DeltaNet's β. `forward(v)` is the layer's own computation (the
chunked kernels of `headlab_kernels.linear_attention`); `pattern()` is the `[B, H, Q, S]` matrix that the layer
applies to v, so that `pattern @ v == forward(v)` (tested for every kind):

- linear / hedgehog / based: A_ij = φ(q_i)·φ(k_j) / (Σ_{l≤i} φ(q_i)·φ(k_l) + ε), j ≤ i (rows sum to 1 − O(ε));
- gla: A_ij = Σ_f q_if k_jf Π_{t=j+1..i} α_tf, j ≤ i (the decayed q·k; no normalisation);
- deltanet: A = tril(Q Kᵀ) (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β) (the delta rule unrolled; signed).

A decode step (`headlab.models.linear.cache.HeadlabLinearCache`) builds a mixer whose Q queries come after `past` keys
already in the cache: `initial_state` is the cache's recurrent state after those keys, `forward(v)` runs the
recurrence from it over the new tokens only (O(1) work per token) and, with `keep_state`, leaves the state after the
last key in `final_state`. Its `pattern()` rows `[B, H, Q, past + Q]` need every key's features (and decays / β),
which the cache keeps only with `keep_keys=True`; without them `pattern()` raises `PatternUnavailable` rather than
return a row over the new keys only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

from headlab.errors import HeadlabError

NORMALISED = frozenset({"linear", "hedgehog", "based"})


class PatternUnavailable(HeadlabError, ValueError):
    """The implicit pattern of a decode step whose cache did not keep the past keys (`keep_keys=False`)."""


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
        past: keys before the first query (a decode step: the tokens already in the cache; 0 for a full forward).
            fk / g / beta then hold either every key (`past + Q` rows: the pattern is available) or only the Q new
            ones (the pattern raises `PatternUnavailable`); the new keys are always their last Q rows.
        initial_state: the recurrent state after those `past` keys, in the kernels' layout (linear kinds: (S
            `[B, H, F, D]`, z `[B, H, F]`); gla: S `[B, H, F, D]`; deltanet: S `[B, H, D, F]`); None = zero.
        keep_state: `forward` also sets `final_state`, the state after the last key (same layout), through the torch
            chunked forms (which return it).
        final_state: set by `forward` when keep_state.
    """

    kind: str
    fq: torch.Tensor
    fk: torch.Tensor
    g: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    eps: float = 1e-6
    impl: str = "auto"
    past: int = 0
    initial_state: Any = None
    keep_state: bool = False
    final_state: Any = field(default=None, repr=False)

    @property
    def normalised(self) -> bool:
        """Whether the rows of the pattern are normalised weights (sum 1, non-negative)."""
        return self.kind in NORMALISED

    @property
    def has_pattern(self) -> bool:
        """Whether `pattern()` can be computed: a full forward, or a decode step that holds every past key."""
        return self.past == 0 or self.fk.shape[2] == self.past + self.fq.shape[2]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The layer's mixing of values `[B, H, S, D]` → `[B, H, Q, D]` (float32).

        A decode step (past > 0) or a forward that keeps its state runs the recurrence from `initial_state` over the
        last Q keys and values only (v may hold every key's value or just the new ones).
        """
        if self.past or self.initial_state is not None or self.keep_state:
            return self._stateful(v)
        if self.kind in NORMALISED:
            return linear_attention(self.fq, self.fk, v, normalize=True, eps=self.eps, impl=self.impl)
        if self.kind == "gla":
            # on CPU the torch form's intra-chunk [n, n, F] decay product is cheapest with short chunks
            return gla_attention(self.fq, self.fk, v, self.g, impl=self.impl, chunk=None if v.is_cuda else 8)
        if self.kind == "deltanet":
            return delta_attention(self.fq, self.fk, v, self.beta, impl=self.impl)
        raise ValueError(f"unknown linear kind {self.kind!r}")

    def _stateful(self, v: torch.Tensor) -> torch.Tensor:
        """The recurrence from `initial_state` over the new (last Q) keys; sets `final_state` when keep_state."""
        Q = self.fq.shape[2]
        if self.past and self.initial_state is None:
            raise ValueError(f"a decode mixer ({self.past} keys before its queries) needs the cache's initial_state")
        if not (self.fk.shape[2] == Q or self.has_pattern) or v.shape[2] not in (Q, self.past + Q):
            raise ValueError(f"a mixer with {Q} queries after {self.past} keys got fk of {self.fk.shape[2]} and v of "
                             f"{v.shape[2]} rows: give the {Q} new ones or all {self.past + Q}")
        fk, v = self.fk[:, :, -Q:], v[:, :, -Q:]
        if self.kind in NORMALISED:
            o, state = linear_chunked(self.fq, fk, v, normalize=True, eps=self.eps, initial_state=self.initial_state,
                                      return_state=True)
        elif self.kind == "gla":
            o, state = gla_chunked(self.fq, fk, v, self.g[:, :, -Q:], chunk=64 if v.is_cuda else 8,
                                   initial_state=self.initial_state, return_state=True)
        elif self.kind == "deltanet":
            o, state = delta_chunked(self.fq, fk, v, self.beta[:, :, -Q:], initial_state=self.initial_state,
                                     return_state=True)
        else:
            raise ValueError(f"unknown linear kind {self.kind!r}")
        if self.keep_state:
            self.final_state = state
        return o

    def pattern(self, heads: list[int] | None = None, rows: slice | None = None) -> torch.Tensor:
        """The implicit pattern `[B, h, Q, S]` (float32) of the given heads (all when None), optionally of some query rows.

        For a decode step, S = past + Q (every key so far) and the rows are the new queries' (bottom-right aligned);
        it needs the keys the cache kept with `keep_keys=True`, else `PatternUnavailable`.
        """
        idx = None if heads is None else torch.as_tensor(list(heads), device=self.fq.device)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or idx is None else t.index_select(1, idx)

        if self.past:
            return self._decode_pattern(pick, rows)
        fq, fk = pick(self.fq), pick(self.fk)
        if self.kind in NORMALISED:
            return linear_pattern(fq, fk, normalize=True, eps=self.eps, rows=rows)
        if self.kind == "gla":
            return gla_pattern(fq, fk, pick(self.g), rows=rows)
        if self.kind == "deltanet":
            return delta_pattern(fq, fk, pick(self.beta), rows=rows)
        raise ValueError(f"unknown linear kind {self.kind!r}")

    def _decode_pattern(self, pick, rows: slice | None) -> torch.Tensor:
        """The rows of a decode step's queries over every key so far, `[B, h, n, past + Q]`."""
        Q = self.fq.shape[2]
        if not self.has_pattern:
            raise PatternUnavailable(
                f"the pattern of this decode step ({Q} new token(s) after {self.past} cached ones) needs the past keys' "
                f"features{' and decays' if self.kind == 'gla' else ' and β' if self.kind == 'deltanet' else ''}, "
                "which the cache did not keep: make the cache with HeadlabLinearCache(config, keep_keys=True) (e.g. "
                "generate(..., cache=HeadlabLinearCache(model.config, keep_keys=True)) or forward_cached(ids, that "
                "cache)), or capture a full forward of the prefix instead")
        start, stop, step = (rows or slice(None)).indices(Q)
        shifted = slice(start + self.past, stop + self.past, step)  # stop = -1 (a reverse slice) stays >= 0
        fq, fk = pick(self.fq), pick(self.fk)
        if self.kind == "deltanet":
            return _delta_rows(fq[:, :, rows or slice(None)], fk, pick(self.beta),
                               torch.arange(self.past, self.past + Q)[rows or slice(None)])
        # the rows before `past` are not this step's queries: zeros there, and only the selected rows are computed
        fq = torch.cat([fq.new_zeros(*fq.shape[:2], self.past, fq.shape[3]), fq], dim=2)
        if self.kind in NORMALISED:
            return linear_pattern(fq, fk, normalize=True, eps=self.eps, rows=shifted)
        if self.kind == "gla":
            return gla_pattern(fq, fk, pick(self.g), rows=shifted)
        raise ValueError(f"unknown linear kind {self.kind!r}")

    def state(self, v: torch.Tensor) -> torch.Tensor:
        """The recurrent state after the last key, `[B, H, F, D]` (what a linear layer keeps instead of a KV cache).

        linear kinds: Σ_j φ(k_j) v_jᵀ; gla: Σ_j diag(Π_{t>j} α_t) k_j v_jᵀ; deltanet: the delta-rule state
        (transposed to `[F, D]`). A decode mixer continues from its initial_state (or returns its final_state).
        """
        if self.past or self.initial_state is not None or self.final_state is not None:
            state = self.final_state
            if state is None:
                keep, self.keep_state = self.keep_state, True
                try:
                    self._stateful(v)
                    state = self.final_state
                finally:
                    self.keep_state = keep
            if self.kind in NORMALISED:
                return state[0]
            return state.transpose(-1, -2) if self.kind == "deltanet" else state
        if self.kind in NORMALISED:
            return linear_chunked(self.fq, self.fk, v, normalize=True, eps=self.eps, return_state=True)[1][0]
        if self.kind == "gla":
            return gla_chunked(self.fq, self.fk, v, self.g, chunk=16, return_state=True)[1]
        if self.kind == "deltanet":
            return delta_chunked(self.fq, self.fk, v, self.beta, return_state=True)[1].transpose(-1, -2)
        raise ValueError(f"unknown linear kind {self.kind!r}")


def _delta_rows(fq: torch.Tensor, fk: torch.Tensor, beta: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of the delta rule's pattern for queries fq `[B, h, n, F]` at absolute positions pos `[n]`, over keys fk
    `[B, h, S, F]` with strengths beta `[B, h, S]`: `[B, h, n, S]` float32.

    M_tj = β_j k_jᵀ (I − β_{j+1} k_{j+1} k_{j+1}ᵀ) ⋯ (I − β_t k_t k_tᵀ) q_t (the unrolled S_t q_t), swept from the last key
    back to the first: O(S·F) per row, where `delta_pattern` would solve an `[S, S]` triangular system.
    """
    f32 = torch.float32
    u = fq.to(f32).clone()
    k, b = fk.to(f32), beta.to(f32)
    B, h, n, _ = u.shape
    out = u.new_zeros(B, h, n, k.shape[2])
    pos = pos.to(u.device)
    for j in range(int(pos.max()) if n else -1, -1, -1):
        kj = k[:, :, j]  # [B, h, F]
        w = b[:, :, j, None] * torch.einsum("bhnf,bhf->bhn", u, kj) * (pos >= j).to(f32)  # inactive rows: 0
        out[:, :, :, j] = w
        u = u - w[..., None] * kj[:, :, None]
    return out
