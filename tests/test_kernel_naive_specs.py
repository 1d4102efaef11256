"""The per-rule naive specs of `headlab_kernels.linear_attention` against the fast forms, and the layout.

Each rule's module (`linear`, `gla`, `delta`) keeps its naive spec beside its fast forms: the
`*_recurrent` function, a plain loop over time steps carrying the state. Here each spec is checked
(1) against one step of the recurrence written out literally from an initial state, and (2) against
the parallel and chunked forms on small random float64 inputs, for lengths that are and are not
multiples of the chunk, with and without an initial state, outputs and final states alike.
"""

from __future__ import annotations

import pytest
import torch

from headlab_kernels import linear_attention as la
from headlab_kernels.head_stats import head_stats_materialised
from headlab_kernels.head_stats import spec as head_stats_spec
from headlab_kernels.linear_attention import delta, gla, linear, reference

torch.set_num_threads(1)

LENGTHS = (1, 5, 8, 16, 19, 45)  # chunk sizes 4, 8, 16: multiples, partial last chunks, one short chunk
CHUNKS = (4, 8, 16)
B, H, F, D = 2, 3, 4, 5
f64 = torch.float64


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Max abs error within tol relative to the reference's scale (max |want|, at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} × scale {scale:.3g}"


def _inputs(T: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 7919 * T)
    r = lambda *s: torch.rand(*s, generator=gen, dtype=f64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=f64)  # noqa: E731
    return dict(
        q=r(B, H, T, F) + 0.05, k=r(B, H, T, F) + 0.05,  # positive features for the normalised linear form
        v=n(B, H, T, D),
        g=-2.0 * r(B, H, T, F),  # log decays in [-2, 0]
        beta=0.05 + 0.9 * r(B, H, T),
        qn=n(B, H, T, F) / F ** 0.5,
        kn=torch.nn.functional.normalize(n(B, H, T, F), dim=-1),  # the delta rule's L2-normalised keys
        S0=0.5 * n(B, H, F, D), z0=r(B, H, F), S0_delta=0.5 * n(B, H, D, F),
    )


# ------------------------------------------------------------------------------------ layout


def test_each_rule_lives_in_its_module_and_is_re_exported():
    for mod, rule in ((linear, "linear"), (gla, "gla"), (delta, "delta")):
        assert set(mod.__all__) == {f"{rule}_{form}" for form in ("recurrent", "parallel", "chunked", "pattern")}
        assert "naive spec" in mod.__doc__ and f"`{rule}_recurrent`" in mod.__doc__
        for name in mod.__all__:
            assert getattr(reference, name) is getattr(mod, name)
            assert getattr(la, name) is getattr(mod, name)
    assert set(reference.__all__) == set(linear.__all__) | set(gla.__all__) | set(delta.__all__)
    assert head_stats_materialised is head_stats_spec.head_stats_materialised


# ---------------------------------------------------------------- the specs are the recurrences


def test_specs_take_one_literal_step():
    x = _inputs(1)
    q, k, v, g, beta = (x[n][:, :, 0] for n in ("q", "k", "v", "g", "beta"))
    qn, kn = x["qn"][:, :, 0], x["kn"][:, :, 0]
    S0, z0, Sd0 = x["S0"], x["z0"], x["S0_delta"]
    # linear: S_1 = S_0 + k vᵀ, z_1 = z_0 + k, o = qᵀ S_1 / (q·z_1 + eps)
    S1 = S0 + k[..., :, None] * v[..., None, :]
    z1 = z0 + k
    num = (q[..., :, None] * S1).sum(-2)
    o, (S, z) = linear.linear_recurrent(x["q"], x["k"], x["v"], initial_state=(S0, z0), return_state=True)
    _close(o[:, :, 0], num / ((q * z1).sum(-1, keepdim=True) + 1e-6))
    _close(S, S1)
    _close(z, z1)
    _close(linear.linear_recurrent(x["q"], x["k"], x["v"], normalize=False, initial_state=(S0, z0))[:, :, 0], num)
    # GLA: S_1 = diag(exp(g)) S_0 + k vᵀ, o = qᵀ S_1
    S1 = torch.exp(g)[..., :, None] * S0 + k[..., :, None] * v[..., None, :]
    o, S = gla.gla_recurrent(x["q"], x["k"], x["v"], x["g"], initial_state=S0, return_state=True)
    _close(o[:, :, 0], (q[..., :, None] * S1).sum(-2))
    _close(S, S1)
    # delta rule: S_1 = S_0 (I - β k kᵀ) + β v kᵀ, o = S_1 q (the product form, not the error form)
    b = beta[..., None, None]
    eye = torch.eye(F, dtype=f64)
    S1 = Sd0 @ (eye - b * kn[..., :, None] * kn[..., None, :]) + b * v[..., :, None] * kn[..., None, :]
    o, S = delta.delta_recurrent(x["qn"], x["kn"], x["v"], x["beta"], initial_state=Sd0, return_state=True)
    _close(o[:, :, 0], (S1 @ qn[..., :, None])[..., 0])
    _close(S, S1)


# ------------------------------------------------------------- specs against parallel / chunked


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_linear_spec_matches_parallel_and_chunked(T, with_state):
    x = _inputs(T)
    state = (x["S0"], x["z0"]) if with_state else None
    for normalize in (True, False):
        kw = dict(normalize=normalize, initial_state=state, return_state=True)
        want, (S_want, z_want) = linear.linear_recurrent(x["q"], x["k"], x["v"], **kw)
        forms = [linear.linear_parallel(x["q"], x["k"], x["v"], **kw)]
        forms += [linear.linear_chunked(x["q"], x["k"], x["v"], chunk=c, **kw) for c in CHUNKS]
        for o, (S, z) in forms:
            _close(o, want)
            _close(S, S_want)
            _close(z, z_want)
        if not with_state:
            _close(linear.linear_pattern(x["q"], x["k"], normalize=normalize) @ x["v"].float(), want)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_gla_spec_matches_parallel_and_chunked(T, with_state):
    x = _inputs(T)
    kw = dict(initial_state=x["S0"] if with_state else None, return_state=True)
    want, S_want = gla.gla_recurrent(x["q"], x["k"], x["v"], x["g"], **kw)
    forms = [gla.gla_parallel(x["q"], x["k"], x["v"], x["g"], **kw)]
    forms += [gla.gla_chunked(x["q"], x["k"], x["v"], x["g"], chunk=c, **kw) for c in CHUNKS]
    for o, S in forms:
        _close(o, want)
        _close(S, S_want)
    if not with_state:
        _close(gla.gla_pattern(x["q"], x["k"], x["g"], block=8) @ x["v"].float(), want)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_delta_spec_matches_parallel_and_chunked(T, with_state):
    x = _inputs(T)
    kw = dict(initial_state=x["S0_delta"] if with_state else None, return_state=True)
    want, S_want = delta.delta_recurrent(x["qn"], x["kn"], x["v"], x["beta"], **kw)
    forms = [delta.delta_parallel(x["qn"], x["kn"], x["v"], x["beta"], **kw)]
    forms += [delta.delta_chunked(x["qn"], x["kn"], x["v"], x["beta"], chunk=c, **kw) for c in CHUNKS]
    for o, S in forms:
        _close(o, want)
        _close(S, S_want)
    if not with_state:
        _close(delta.delta_pattern(x["qn"], x["kn"], x["beta"]) @ x["v"].float(), want)
