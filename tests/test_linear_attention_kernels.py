"""Linear attention, GLA and the delta rule: every form against an independent float64 loop, and each other.

The float64 anchors below are written from the definitions (sums over the history, explicit decay
products, explicit I - β k kᵀ matrices), not from the package's code. Then: recurrent, parallel,
chunked and pattern @ v agree; the Triton kernels (CPU interpreter, tiny shapes) match; gradients
through the chunked forms and the Triton wrappers equal those through the parallel forms; states
returned and carried agree; strong GLA decays stay finite; bad shapes raise clear ValueErrors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: no GPU in CI

import pytest  # noqa: E402
import torch  # noqa: E402

from headlab_kernels.linear_attention import (delta_attention, delta_chunked, delta_parallel, delta_pattern,  # noqa: E402
                                      delta_recurrent, gla_attention, gla_chunked, gla_parallel, gla_pattern,
                                      gla_recurrent, linear_attention, linear_chunked, linear_parallel,
                                      linear_pattern, linear_recurrent)

torch.set_num_threads(1)

LENGTHS = (1, 7, 37, 100)
CHUNKS = (16, 32)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Max abs error within tol relative to the reference's scale (max |want|, at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} × scale {scale:.3g}"


def _inputs(T: int, *, B: int = 2, H: int = 2, F: int = 6, D: int = 5, seed: int = 0, g_min: float = -1.0):
    gen = torch.Generator().manual_seed(seed + 1000 * T)
    q = torch.rand(B, H, T, F, generator=gen) + 0.05  # positive features: the normaliser stays > 0
    k = torch.rand(B, H, T, F, generator=gen) + 0.05
    v = torch.randn(B, H, T, D, generator=gen)
    g = torch.rand(B, H, T, F, generator=gen) * g_min  # log decays in [g_min, 0]
    beta = torch.rand(B, H, T, generator=gen) * 0.9 + 0.05
    kn = torch.nn.functional.normalize(torch.randn(B, H, T, F, generator=gen), dim=-1)
    qn = torch.randn(B, H, T, F, generator=gen) / F ** 0.5
    return q, k, v, g, beta, qn, kn


# ------------------------------------------------------------------- independent float64 anchors


def naive_linear(q, k, v, normalize=True, eps=1e-6):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(*v.shape, dtype=torch.float64)
    for t in range(q.shape[2]):
        w = (q[:, :, t, None, :] * k[:, :, :t + 1]).sum(-1)  # [B, H, t+1]: q_t · k_j
        num = (w[..., None] * v[:, :, :t + 1]).sum(2)
        out[:, :, t] = num / (w.sum(-1, keepdim=True) + eps) if normalize else num
    return out


def naive_gla(q, k, v, g):
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    B, H, T, F = q.shape
    out = torch.zeros(*v.shape, dtype=torch.float64)
    for t in range(T):
        for j in range(t + 1):
            decay = torch.exp(g[:, :, j + 1:t + 1].sum(2))  # Π_{s=j+1..t} exp(g_s), [B, H, F]
            w = (q[:, :, t] * k[:, :, j] * decay).sum(-1)  # [B, H]
            out[:, :, t] += w[..., None] * v[:, :, j]
    return out


def naive_delta(q, k, v, beta, S=None):
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    B, H, T, F = q.shape
    D = v.shape[-1]
    S = torch.zeros(B, H, D, F, dtype=torch.float64) if S is None else S.double()
    eye = torch.eye(F, dtype=torch.float64)
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for t in range(T):
        kt, bt = k[:, :, t], beta[:, :, t, None, None]
        S = S @ (eye - bt * kt[..., :, None] * kt[..., None, :]) + bt * v[:, :, t, :, None] * kt[..., None, :]
        out[:, :, t] = (S @ q[:, :, t, :, None])[..., 0]
    return out, S


# --------------------------------------------------------------------------------- forms agree


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_forms_agree(T, normalize):
    q, k, v, *_ = _inputs(T)
    want = naive_linear(q, k, v, normalize)
    tol = 1e-5  # relative to max |o| (unnormalised outputs grow with T)
    _close(linear_recurrent(q, k, v, normalize=normalize), want, tol)
    _close(linear_parallel(q, k, v, normalize=normalize), want, tol)
    for chunk in CHUNKS:
        _close(linear_chunked(q, k, v, normalize=normalize, chunk=chunk), want, tol)
    _close(linear_pattern(q, k, normalize=normalize) @ v, want, tol)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("g_min", [-1.0, -5.0])
def test_gla_forms_agree(T, g_min):
    q, k, v, g, *_ = _inputs(T, g_min=g_min)
    if g_min < -1:  # strong decays: some steps at exactly -5, the rest spread down to it
        g[..., ::3, :] = -5.0
    want = naive_gla(q, k, v, g)
    _close(gla_recurrent(q, k, v, g), want)
    _close(gla_parallel(q, k, v, g), want)
    for chunk in CHUNKS:
        _close(gla_chunked(q, k, v, g, chunk=chunk), want)
    _close(gla_pattern(q, k, g) @ v, want)


@pytest.mark.parametrize("T", LENGTHS)
def test_delta_forms_agree(T):
    _, _, v, _, beta, q, k = _inputs(T)
    want, S_want = naive_delta(q, k, v, beta)
    o, S = delta_recurrent(q, k, v, beta, return_state=True)
    _close(o, want)
    _close(S, S_want)
    _close(delta_parallel(q, k, v, beta), want)
    for chunk in CHUNKS:
        _close(delta_chunked(q, k, v, beta, chunk=chunk), want)
    _close(delta_pattern(q, k, beta) @ v, want)


def test_patterns_rows_and_causality():
    T = 37
    q, k, v, g, beta, qn, kn = _inputs(T)
    for full, part in [
        (linear_pattern(q, k), lambda r: linear_pattern(q, k, rows=r)),
        (linear_pattern(q, k, normalize=False), lambda r: linear_pattern(q, k, normalize=False, rows=r)),
        (gla_pattern(q, k, g), lambda r: gla_pattern(q, k, g, rows=r, block=4)),
        (delta_pattern(qn, kn, beta), lambda r: delta_pattern(qn, kn, beta, rows=r)),
    ]:
        assert full.shape == (2, 2, T, T)
        assert (full.triu(1) == 0).all()
        for rows in (slice(0, 1), slice(5, 20, 3), slice(-4, None), slice(30, 10)):
            got = part(rows)
            assert got.shape == full[:, :, rows].shape
            _close(got, full[:, :, rows], 1e-6)
    # the normalised linear pattern is a probability distribution over the visible keys
    _close(linear_pattern(q, k).sum(-1), torch.ones(2, 2, T), 1e-5)


# ------------------------------------------------------------------------------------- states


@pytest.mark.parametrize("T", [7, 37])
def test_states_match_recurrent_and_carry(T):
    q, k, v, g, beta, qn, kn = _inputs(T)
    cut = T // 2 + 1
    # linear
    o, (S, z) = linear_recurrent(q, k, v, return_state=True)
    _close(S, k.double().transpose(-1, -2) @ v.double())  # S_T = Σ k_j v_jᵀ, independently
    _close(z, k.double().sum(2))
    for fn in (linear_parallel, lambda *a, **kw: linear_chunked(*a, chunk=16, **kw)):
        o2, (S2, z2) = fn(q, k, v, return_state=True)
        _close(o2, o)
        _close(S2, S)
        _close(z2, z)
        _, st = fn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], return_state=True)
        o_tail = fn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=st)
        _close(o_tail, o[:, :, cut:])
    # GLA
    o, S = gla_recurrent(q, k, v, g, return_state=True)
    G = g.double().cumsum(2)
    S_want = (k.double() * torch.exp(G[:, :, -1:] - G)).transpose(-1, -2) @ v.double()
    _close(S, S_want)
    for fn in (gla_parallel, lambda *a, **kw: gla_chunked(*a, chunk=16, **kw)):
        o2, S2 = fn(q, k, v, g, return_state=True)
        _close(o2, o)
        _close(S2, S)
        _, st = fn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[:, :, :cut], return_state=True)
        _close(fn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[:, :, cut:], initial_state=st), o[:, :, cut:])
    # delta rule
    o, S = delta_recurrent(qn, kn, v, beta, return_state=True)
    for fn in (delta_parallel, lambda *a, **kw: delta_chunked(*a, chunk=16, **kw)):
        o2, S2 = fn(qn, kn, v, beta, return_state=True)
        _close(o2, o)
        _close(S2, S)
        _, st = fn(qn[:, :, :cut], kn[:, :, :cut], v[:, :, :cut], beta[:, :, :cut], return_state=True)
        o_tail = fn(qn[:, :, cut:], kn[:, :, cut:], v[:, :, cut:], beta[:, :, cut:], initial_state=st)
        _close(o_tail, o[:, :, cut:])
    want_tail, _ = naive_delta(qn[:, :, cut:], kn[:, :, cut:], v[:, :, cut:], beta[:, :, cut:], S=st)
    _close(o[:, :, cut:], want_tail)


# ---------------------------------------------------------------------------------- gradients


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)  # a fixed, non-trivial upstream gradient
    (out * w).sum().backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize("T", [7, 37])
def test_gradients_chunked_equal_parallel(T):
    q, k, v, g, beta, qn, kn = _inputs(T, B=1)
    pairs = [
        ((q, k, v), lambda *a: linear_chunked(*a, chunk=16), lambda *a: linear_parallel(*a)),
        ((q, k, v), lambda *a: linear_chunked(*a, normalize=False, chunk=16),
         lambda *a: linear_parallel(*a, normalize=False)),
        ((q, k, v, g * 3), lambda *a: gla_chunked(*a, chunk=16), lambda *a: gla_parallel(*a)),
        ((qn, kn, v, beta), lambda *a: delta_chunked(*a, chunk=16), lambda *a: delta_parallel(*a)),
    ]
    for xs, chunked, parallel in pairs:
        for ga, gb in zip(_grads(chunked, *xs), _grads(parallel, *xs)):
            _close(ga, gb, 2e-5)


# ------------------------------------------------------------------------------------- Triton


try:
    from headlab_kernels.linear_attention.triton import gla_chunked_triton, linear_chunked_triton
    HAS_TRITON = True
except ImportError:  # the torch forms above are still tested
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TRITON_SHAPES = [  # (B, H, T, F, D)
    (1, 2, 1, 5, 3),
    (2, 1, 7, 16, 16),
    (1, 2, 37, 5, 3),
    (1, 1, 100, 20, 70),  # F padded to 32, D split into two value blocks (64 + 6)
]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "B{}-H{}-T{}-F{}-D{}".format(*s))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_triton_linear_matches(shape, chunk):
    B, H, T, F, D = shape
    q, k, v, *_ = _inputs(T, B=B, H=H, F=F, D=D)
    for normalize in (True, False):
        want = naive_linear(q, k, v, normalize)
        got = linear_chunked_triton(q, k, v, normalize=normalize, chunk=chunk)
        assert got.dtype == torch.float32
        _close(got, want)
        _close(got, linear_chunked(q, k, v, normalize=normalize, chunk=chunk))


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "B{}-H{}-T{}-F{}-D{}".format(*s))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_triton_gla_matches(shape, chunk):
    B, H, T, F, D = shape
    q, k, v, g, *_ = _inputs(T, B=B, H=H, F=F, D=D, g_min=-5.0)
    want = naive_gla(q, k, v, g)
    got = gla_chunked_triton(q, k, v, g, chunk=chunk)
    _close(got, want)
    _close(got, gla_chunked(q, k, v, g, chunk=chunk))


@needs_triton
def test_triton_strided_and_half_inputs():
    q, k, v, g, *_ = _inputs(37, B=1, H=2, F=8, D=8)
    # non-contiguous views: [B, T, H, F] storage seen as [B, H, T, F]
    qs, ks, vs, gs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g))
    assert not qs.is_contiguous()
    _close(linear_chunked_triton(qs, ks, vs, chunk=16), naive_linear(q, k, v))
    _close(gla_chunked_triton(qs, ks, vs, gs, chunk=16), naive_gla(q, k, v, g))
    # bfloat16 inputs: float32 math on the rounded values
    qb, kb, vb, gb = (x.bfloat16() for x in (q, k, v, g))
    _close(linear_chunked_triton(qb, kb, vb, chunk=16), naive_linear(qb, kb, vb))
    _close(gla_chunked_triton(qb, kb, vb, gb, chunk=16), naive_gla(qb, kb, vb, gb))


@needs_triton
def test_triton_gradients_are_the_references():
    q, k, v, g, *_ = _inputs(21, B=1, H=1, F=5, D=3)
    for ga, gb in zip(_grads(lambda *a: linear_chunked_triton(*a, chunk=16), q, k, v),
                      _grads(lambda *a: linear_parallel(*a), q, k, v)):
        _close(ga, gb, 2e-5)
    for ga, gb in zip(_grads(lambda *a: gla_chunked_triton(*a, chunk=16), q, k, v, g),
                      _grads(lambda *a: gla_parallel(*a), q, k, v, g)):
        _close(ga, gb, 2e-5)


@needs_triton
def test_gla_strong_decay_long_chunk_is_finite():
    # chunk 128 with g = -5 everywhere: exp(+-Σg) would be exp(640) if the decays were factored
    q, k, v, g, *_ = _inputs(130, B=1, H=1, F=4, D=3)
    g = torch.full_like(g, -5.0)
    want = naive_gla(q[:, :, :40], k[:, :, :40], v[:, :, :40], g[:, :, :40])
    for got in (gla_chunked(q, k, v, g, chunk=128), gla_chunked_triton(q, k, v, g, chunk=128),
                gla_parallel(q, k, v, g)):
        assert torch.isfinite(got).all()
        _close(got[:, :, :40], want)
    # with decay exp(-5) per step, o_t is q_t·k_t v_t up to e^-5 of the rest
    _close(gla_chunked(q, k, v, g, chunk=128), gla_recurrent(q, k, v, g))


# ------------------------------------------------------------------------------------ dispatch


@needs_triton
def test_dispatchers():
    q, k, v, g, beta, qn, kn = _inputs(37)
    want = naive_linear(q, k, v)
    for impl in ("auto", "torch", "reference", "triton"):
        _close(linear_attention(q, k, v, impl=impl), want)
        _close(gla_attention(q, k, v, g, impl=impl), naive_gla(q, k, v, g))
    _close(linear_attention(q, k, v, normalize=False, impl="triton", chunk=16), naive_linear(q, k, v, False))
    _close(delta_attention(qn, kn, v, beta), naive_delta(qn, kn, v, beta)[0])
    with pytest.raises(NotImplementedError, match="no Triton delta-rule kernel"):
        delta_attention(qn, kn, v, beta, impl="triton")
    with pytest.raises(ValueError, match="impl must be"):
        linear_attention(q, k, v, impl="cuda")


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    q, k, v, g, *_ = _inputs(7)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_attention(q, k, v, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gla_attention(q, k, v, g, impl="triton")


def test_bad_shapes_raise_clear_errors():
    q, k, v, g, beta, qn, kn = _inputs(7, F=6, D=5)
    with pytest.raises(ValueError, match="feature dims differ"):
        linear_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="must be 4-D"):
        linear_parallel(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"v .* does not match q"):
        linear_chunked(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"differ in \[B, H, T\]"):
        gla_recurrent(q, k[:, :, :3], v, g)
    with pytest.raises(ValueError, match="g shape .* is not q's shape"):
        gla_attention(q, k, v, g[..., :3])
    with pytest.raises(ValueError, match="g shape"):
        gla_pattern(q, k, g[:, :1])
    with pytest.raises(ValueError, match=r"beta must be \[B, H, T\]"):
        delta_attention(qn, kn, v, beta[..., None])
    with pytest.raises(ValueError, match=r"beta must be \[B, H, T\]"):
        delta_pattern(qn, kn, beta[:, :1])
    with pytest.raises(ValueError, match="chunk must be"):
        linear_chunked(q, k, v, chunk=0)
    with pytest.raises(ValueError, match=r"initial_state S must have shape"):
        gla_chunked(q, k, v, g, initial_state=torch.zeros(2, 2, 5, 6))
    with pytest.raises(ValueError, match=r"initial_state S \(delta rule"):
        delta_chunked(qn, kn, v, beta, initial_state=torch.zeros(2, 2, 6, 5))
    with pytest.raises(ValueError, match="rows must be a slice"):
        linear_pattern(q, k, rows=[1, 2])


@needs_triton
def test_triton_bad_arguments_raise_clear_errors():
    q, k, v, g, *_ = _inputs(7, F=6, D=5)
    with pytest.raises(ValueError, match="power of two"):
        linear_chunked_triton(q, k, v, chunk=24)
    with pytest.raises(ValueError, match="F <= 128"):
        linear_chunked_triton(torch.rand(1, 1, 3, 130), torch.rand(1, 1, 3, 130), v[:1, :1, :3])
    with pytest.raises(ValueError, match="g shape"):
        gla_chunked_triton(q, k, v, g[..., :2])
