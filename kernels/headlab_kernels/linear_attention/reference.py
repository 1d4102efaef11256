"""Pure-torch causal linear attention in three forms each: the spec of the Triton kernels and the CPU path.

This module only re-exports: each rule lives in its own module, `linear` (linear / kernel
attention), `gla` (gated linear attention) and `delta` (the delta rule, DeltaNet), and the helpers
they share in `common`. Import from here or from those modules alike.

Three recurrences, each written as a python loop over time (`*_recurrent`, the definition and the
naive spec), as one `[T, T]` mixing matrix applied to v (`*_parallel`, O(T²) memory) and chunkwise
(`*_chunked`: the `[chunk, chunk]` form inside a chunk, a state carried across chunks; O(T·chunk)
memory). All three forms of a recurrence agree to float32 rounding; all are differentiable (plain
autograd).

- Linear (kernel) attention, state S `[F, D]` and normaliser z `[F]`:
      S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t,
      o_t = (q_tᵀ S_t) / (q_t · z_t + eps)   (normalize=True),   o_t = q_tᵀ S_t   (normalize=False).
- Gated linear attention (GLA), state S `[F, D]`, per-feature log decay g_t `[F]` (<= 0):
      S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t.
- DeltaNet (delta rule), state S `[D, F]`, write strength beta_t in (0, 1):
      S_t = S_{t-1} (I - beta_t k_t k_tᵀ) + beta_t v_t k_tᵀ,   o_t = S_t q_t.

Inputs: q, k `[B, H, T, F]` already feature-mapped (and scaled) by the caller, v `[B, H, T, D]`,
any float dtype; the math is float32 and every output is float32 `[B, H, T, D]`. The `*_pattern`
functions return the implicit attention pattern, the `[B, H, T, T]` matrix P with o = P @ v
exactly (no initial state), or only some of its query rows.
"""

from __future__ import annotations

from .delta import delta_chunked, delta_parallel, delta_pattern, delta_recurrent
from .gla import gla_chunked, gla_parallel, gla_pattern, gla_recurrent
from .linear import linear_chunked, linear_parallel, linear_pattern, linear_recurrent

__all__ = [
    "linear_recurrent", "linear_parallel", "linear_chunked", "linear_pattern",
    "gla_recurrent", "gla_parallel", "gla_chunked", "gla_pattern",
    "delta_recurrent", "delta_parallel", "delta_chunked", "delta_pattern",
]
