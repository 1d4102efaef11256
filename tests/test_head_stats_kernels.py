"""Head-stats kernels: the Triton kernels (CPU interpreter) and the chunked reference against the full pattern.

The pattern is materialised by the spec, `head_stats_materialised` (`headlab_kernels.head_stats.spec`),
in float64, from the same (possibly bf16-rounded) inputs; both
implementations must match it on odd lengths, grouped-query heads, causal (bottom-right when S != T)
and full attention, padded batches, 4D masks and key sets.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: no GPU in CI

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from headlab_kernels.head_stats import HeadStats, head_stats, head_stats_reference  # noqa: E402
from headlab_kernels.head_stats.spec import head_stats_materialised  # noqa: E402
from headlab_kernels.head_stats.triton import head_stats_triton  # noqa: E402


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    S: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    pad: bool = False
    dtype: torch.dtype = torch.float32
    topk: int = 1
    sets: int = 0
    mask4d: bool = False  # a random bool mask as well: [1, 1, T, S] when causal, else [B, 1, T, S]

    @property
    def id(self) -> str:
        return (f"B{self.B}-T{self.T}-S{self.S}-H{self.Hq}-Hkv{self.Hkv}-D{self.D}-"
                f"{'causal' if self.causal else 'full'}{'-pad' if self.pad else ''}{'-mask4d' if self.mask4d else ''}-"
                f"{'bf16' if self.dtype == torch.bfloat16 else 'fp32'}-k{self.topk}-sets{self.sets}")


CASES = [
    Case(1, 1, 1, 2, 2, 16, True),
    Case(2, 63, 63, 4, 2, 16, True, pad=True, topk=3, sets=2),
    Case(2, 63, 63, 2, 2, 32, False, pad=True, sets=3),
    Case(1, 257, 257, 4, 2, 16, True, topk=3, sets=1),
    Case(1, 257, 257, 2, 2, 16, False, pad=True, topk=1),
    Case(2, 63, 100, 4, 2, 16, True, pad=True, topk=3, sets=2),  # queries after a cache: bottom-right causal
    Case(2, 1, 257, 4, 2, 32, True, pad=True, topk=3),  # one decode step
    Case(2, 40, 17, 4, 2, 16, True, topk=3),  # S < T: the first rows see no key
    Case(2, 63, 63, 2, 1, 16, False, pad=True, topk=3, sets=1, mask4d=True),
    Case(2, 63, 63, 4, 2, 16, True, mask4d=True),  # a [1, 1, T, S] mask broadcast over the batch
    Case(2, 63, 63, 4, 2, 16, True, pad=True, dtype=torch.bfloat16, topk=3, sets=2),
    Case(1, 257, 257, 4, 4, 16, False, dtype=torch.bfloat16, topk=1),
]


def make_inputs(c: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(c.B, c.Hq, c.T, c.D, generator=g) * 1.5).to(c.dtype)
    k = (torch.randn(c.B, c.Hkv, c.S, c.D, generator=g) * 1.5).to(c.dtype)
    kw: dict = dict(scale=c.D ** -0.5, causal=c.causal, topk=c.topk)
    if c.pad:
        key_mask = torch.ones(c.B, c.S, dtype=torch.bool)
        key_mask[0, c.S - c.S // 5:] = False  # right padding
        if c.B > 1:
            key_mask[1, : c.S // 3] = False  # left padding
        kw["key_mask"] = key_mask
    if c.mask4d:
        kw["mask"] = torch.rand(1 if c.causal else c.B, 1, c.T, c.S, generator=g) < 0.7
        kw["mask"][0, 0, 3] = False  # a row that sees nothing
    if c.sets:
        kw["key_sets"] = torch.rand(c.sets, c.B, c.S, generator=g) < 0.3
    return dict(q=q, k=k, **kw)


def check(st: HeadStats, ref: dict, c: Case, *, tol: float) -> dict[str, float]:
    """Compare one implementation with the materialised pattern; return the max error of each output."""
    B, H, T, S, k = c.B, c.Hq, c.T, c.S, c.topk
    assert st.topk_idx.shape == (B, H, T, k) and st.topk_idx.dtype == torch.int64
    assert st.lse.shape == st.entropy.shape == (B, H, T) and st.received.shape == (B, H, S)
    assert st.n_visible.shape == (B, S) and st.set_mass.shape == (B, H, T, c.sets)
    assert all(t.dtype == torch.float32 for t in (st.topk_weight, st.lse, st.entropy, st.set_mass, st.received,
                                                   st.n_visible))
    errs = {}
    empty = ref["n_vis_row"] == 0
    assert torch.equal(torch.isinf(st.lse), empty)
    assert torch.all(st.entropy[empty] == 0)
    errs["lse"] = (st.lse[~empty].double() - ref["lse"][~empty]).abs().max().item() if (~empty).any() else 0.0
    for name in ("entropy", "received", "set_mass"):
        if ref[name] is not None:
            errs[name] = (getattr(st, name).double() - ref[name]).abs().max().item() if ref[name].numel() else 0.0
    assert torch.equal(st.n_visible.double(), ref["n_visible"])
    # top-k: weights everywhere, indices where the weight is unique (not tied with a neighbour or the k+1-th)
    kk = min(k, S)
    w = torch.zeros(B, H, T, k, dtype=torch.float64)
    w[..., :kk] = ref["top_w"][..., :kk]
    errs["topk_weight"] = (st.topk_weight.double() - w).abs().max().item()
    beyond = torch.arange(k)[None, None, None, :] >= ref["n_vis_row"][..., None]  # [B, H, T, k]
    assert torch.all(st.topk_idx[beyond] == -1) and torch.all(st.topk_weight[beyond] == 0)
    padded = torch.cat([ref["top_w"], torch.full((B, H, T, k + 1 - ref["top_w"].shape[-1]), -1.0,
                                                   dtype=torch.float64)], -1)[..., : k + 1]
    gap = torch.minimum((padded[..., :k] - padded[..., 1:]).abs(),
                        torch.cat([torch.full((B, H, T, 1), 1.0, dtype=torch.float64),
                                   (padded[..., 1:k] - padded[..., : k - 1]).abs()], -1))
    unique = (gap > 10 * tol) & ~beyond
    assert torch.equal(st.topk_idx[unique], ref["top_i"][..., :k][unique])
    for name, err in errs.items():
        assert err <= tol * (10 if name == "received" else 1), f"{name}: {err:.2e} > {tol:.0e}"
    return errs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_materialised_pattern(case: Case):
    inputs = make_inputs(case)
    ref = head_stats_materialised(**inputs)
    tol = 3e-5 if case.dtype == torch.bfloat16 else 1e-5
    rest = head_stats(**inputs, impl="reference")
    check(rest, ref, case, tol=tol)
    tri = head_stats(**inputs, impl="triton")
    check(tri, ref, case, tol=tol)
    for name in ("lse", "entropy", "topk_weight", "set_mass", "received"):
        torch.testing.assert_close(getattr(tri, name), getattr(rest, name), atol=10 * tol, rtol=1e-5)


@pytest.mark.parametrize("block_q", [1, 7, 64])
def test_reference_block_size_does_not_change_results(block_q: int):
    c = Case(2, 70, 90, 4, 2, 16, True, pad=True, topk=3, sets=2)
    inputs = make_inputs(c, seed=1)
    want = head_stats_reference(**inputs, block_q=70)
    got = head_stats_reference(**inputs, block_q=block_q)
    assert torch.equal(got.topk_idx, want.topk_idx) and torch.equal(got.n_visible, want.n_visible)
    for name in ("topk_weight", "lse", "entropy", "set_mass", "received"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=2e-6, rtol=2e-6)


def test_reference_holds_one_block_of_scores_at_a_time():
    from torch.profiler import ProfilerActivity, profile

    B, H, T, block = 1, 4, 512, 16
    q, k = torch.randn(B, H, T, 16), torch.randn(B, 2, T, 16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        head_stats_reference(q, k, scale=0.25, causal=False, key_mask=torch.ones(B, T, dtype=torch.bool),
                             key_sets=torch.rand(2, B, T) < 0.5, topk=3, block_q=block)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= 2 * B * H * block * T * 4 < B * H * T * T * 4 // 8


def test_key_sets_as_dict_and_column_score():
    c = Case(1, 50, 50, 2, 1, 16, True)
    inputs = make_inputs(c)
    bos = torch.zeros(1, 50, dtype=torch.bool)
    bos[:, 0] = True
    for impl in ("reference", "triton"):
        st = head_stats(**inputs, key_sets={"bos": bos, "rest": ~bos}, impl=impl)
        assert st.set_names == ("bos", "rest")
        torch.testing.assert_close(st.set_mass.sum(-1), torch.ones(1, 2, 50), atol=1e-5, rtol=0)
        # ACT: s_j = Σ_i A_ij / (N - j) for a causal head without padding
        assert torch.equal(st.n_visible[0], torch.arange(50, 0, -1, dtype=torch.float32))
        ref = head_stats_materialised(**inputs)
        want = ref["A"].sum(-2) / torch.arange(50, 0, -1)
        torch.testing.assert_close(st.column_score().double(), want, atol=1e-5, rtol=0)
        assert torch.isnan(st.column_score(min_visible=10)[..., 41:]).all()


def test_ties_and_uniform_rows():
    q = torch.zeros(1, 2, 9, 16)  # every score 0: uniform rows, every key tied
    k = torch.randn(1, 2, 9, 16)
    for impl in ("reference", "triton"):
        st = head_stats(q, k, scale=0.25, causal=True, topk=3, impl=impl)
        n = torch.arange(1, 10, dtype=torch.float32)
        torch.testing.assert_close(st.entropy[0, 0], torch.log(n), atol=1e-6, rtol=0)
        torch.testing.assert_close(st.topk_weight[0, 0, :, 0], 1 / n)
        assert torch.equal(st.topk_idx[0, 0, 0], torch.tensor([0, -1, -1]))
    st = head_stats_triton(q, k, scale=0.25, causal=True, topk=3)
    assert torch.equal(st.topk_idx[0, 0, 5], torch.tensor([0, 1, 2]))  # the kernel keeps the lower keys


def test_triton_takes_strided_inputs_and_additive_masks():
    B, T, H, D = 2, 33, 4, 16
    q = torch.randn(B, T, H, D).transpose(1, 2)  # [B, H, T, D] as HF models hand it over
    k = torch.randn(B, T, 2, D).transpose(1, 2)
    keep = torch.rand(B, 1, T, T) < 0.8
    additive = torch.zeros(B, 1, T, T).masked_fill(~keep, torch.finfo(torch.float32).min)
    a = head_stats_triton(q, k, scale=0.25, causal=True, mask=additive, topk=2)
    b = head_stats_reference(q.contiguous(), k.contiguous(), scale=0.25, causal=True, mask=keep, topk=2)
    torch.testing.assert_close(a.lse, b.lse)
    torch.testing.assert_close(a.received, b.received, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.n_visible, b.n_visible)


def test_dispatch_and_validation():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    auto = head_stats(q, k, scale=0.25, causal=True)  # CPU tensors: the reference
    ref = head_stats_reference(q, k, scale=0.25, causal=True)
    assert torch.equal(auto.lse, ref.lse)
    # one vocabulary with headlab_kernels.linear_attention: "torch" names the torch reference here too
    assert torch.equal(head_stats(q, k, scale=0.25, causal=True, impl="torch").lse, ref.lse)
    with pytest.raises(ValueError, match="impl"):
        head_stats(q, k, scale=0.25, causal=True, impl="cuda")
    with pytest.raises(ValueError, match="does not fit"):
        head_stats(q, torch.randn(1, 3, 5, 16), scale=0.25, causal=True)
    with pytest.raises(ValueError, match="key_mask"):
        head_stats(q, k, scale=0.25, causal=True, key_mask=torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_rows_pass_also_makes_the_attention_output(dtype, causal):
    """With values, the rows kernel accumulates P·V as flash attention does: the output comes from the sweep that
    makes the row statistics, and the columns pass runs only when received attention is asked for."""
    from headlab_kernels.head_stats.triton import attention_stats_triton

    torch.manual_seed(3)
    n_b, n_h, n_g, n_t, d, d_v = 2, 4, 2, 37, 16, 24  # value width unlike the keys'
    q = torch.randn(n_b, n_t, n_h, d).transpose(1, 2).to(dtype)  # strided, as the model's projections are
    k, v = torch.randn(n_b, n_g, n_t, d).to(dtype), torch.randn(n_b, n_g, n_t, d_v).to(dtype)
    real = torch.ones(n_b, n_t, dtype=torch.bool)
    real[1, :4] = False
    mask = None if causal else torch.ones(n_t, n_t).tril().bool()[None, None] & real[:, None, None, :]
    out, st = attention_stats_triton(q, k, v, scale=0.3, causal=causal, mask=mask,
                                     query_mask=None if causal else real, topk=1, received=not causal,
                                     block_m=16, block_n=16)
    assert out.shape == (n_b, n_t, n_h, d_v) and out.dtype == dtype
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    vis = torch.ones(n_t, n_t).tril().bool() if causal else mask
    want = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1) @ v.double().repeat_interleave(2, 1)
    rows = real[:, None, :, None] if not causal else torch.ones(1, 1, n_t, 1, dtype=torch.bool)
    err = (out.transpose(1, 2).double() - want).abs()[rows.expand_as(want)].max()
    assert err < (1e-5 if dtype == torch.float32 else 3e-2)
    ref = head_stats_materialised(q, k, scale=0.3, causal=causal, topk=1, mask=mask,
                                  key_mask=None if causal else real)
    seen = torch.isfinite(ref["lse"])
    assert (st.lse - ref["lse"])[seen].abs().max() < 1e-4
    if causal:
        assert torch.isnan(st.received).all()  # not asked for: the columns pass did not run
    else:
        assert (st.received - ref["received"]).abs().max() < 1e-4
        assert (out[~real] == 0).all()  # padded queries see nothing here
