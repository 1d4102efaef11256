"""Routed (mixture-of-head) attention: the torch routed path and the Triton kernel (CPU interpreter) against
the dense definition, the cost model on hand-counted gate patterns, and clear errors for bad inputs.

`dense_gated` is itself checked against a float64 loop over tokens written from the definition
(softmax over the causal prefix of real keys, times the gate), not from the package's code.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: no GPU in CI

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from headlab_kernels.routed_attention import (dense_gated, resolve_impl, routed_attention, routed_costs,  # noqa: E402
                                              routed_torch)
from headlab_kernels.routed_attention.triton import pack_active_rows, routed_triton  # noqa: E402

torch.set_num_threads(1)


@dataclass(frozen=True)
class Case:
    B: int = 2
    H: int = 6
    G: int = 2
    T: int = 23
    D: int = 8
    gates: str = "half"  # half | all_on | all_off | rows_off | one_head | binary
    pad: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return (f"B{self.B}-H{self.H}-G{self.G}-T{self.T}-D{self.D}-{self.gates}{'-pad' if self.pad else ''}-"
                f"{str(self.dtype).removeprefix('torch.')}")


def make(c: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(c.B, c.H, c.T, c.D, generator=gen, dtype=torch.float64) * 1.5).to(c.dtype)
    k = (torch.randn(c.B, c.G, c.T, c.D, generator=gen, dtype=torch.float64) * 1.5).to(c.dtype)
    v = torch.randn(c.B, c.G, c.T, c.D, generator=gen, dtype=torch.float64).to(c.dtype)
    frac = torch.rand(c.B, c.T, c.H, generator=gen, dtype=torch.float64) * 1.8 + 0.1  # fractional values
    on = torch.rand(c.B, c.T, c.H, generator=gen) < 0.5
    if c.gates == "all_on":
        on[:] = True
    elif c.gates == "all_off":
        on[:] = False
    elif c.gates == "rows_off":  # some tokens with every head off, others with every head on
        on[:, ::3] = False
        on[:, 1::3] = True
    elif c.gates == "one_head":  # one head on everywhere, the rest off
        on[:] = False
        on[..., c.H - 1] = True
    gates = torch.where(on, frac, 0.0)
    if c.gates == "binary":
        gates = on.double()
    gates = gates.to(torch.float64 if c.dtype == torch.float64 else torch.float32)
    key_mask = None
    if c.pad:
        key_mask = torch.ones(c.B, c.T, dtype=torch.bool)
        key_mask[0, :4] = False  # left padding: queries 0..3 of batch 0 see no real key
        if c.B > 1:
            key_mask[1, c.T - 5:] = False  # right padding
            key_mask[1, 7] = False  # a hole
    return q, k, v, gates, key_mask


def naive_gated(q, k, v, gates, key_mask=None, scale=None):
    """Float64 loop over tokens: o[b, t, h] = gate · Σ_{j <= t, real} softmax_j(scale q·k_j) v_j (0 if none real)."""
    q, k, v, gates = q.double(), k.double(), v.double(), gates.double()
    B, H, T, D = q.shape
    R = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // R
            for t in range(T):
                real = [j for j in range(t + 1) if key_mask is None or bool(key_mask[b, j])]
                if not real:
                    continue
                s = torch.stack([q[b, h, t] @ k[b, g, j] for j in real]) * scale
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[b, t, h] = gates[b, t, h] * (w[:, None] * v[b, g, real]).sum(0)
    return out


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Max abs error within tol relative to the reference's scale (max |want|, at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} x scale {scale:.3g}"


TORCH_CASES = [
    Case(),  # GQA, random half of the heads, fractional gates
    Case(pad=True),
    Case(gates="all_on", pad=True),
    Case(gates="rows_off"),
    Case(gates="all_off"),
    Case(gates="one_head", pad=True),
    Case(H=4, G=4, gates="binary"),  # plain multi-head
    Case(H=4, G=1, T=1),  # multi-query, one token
    Case(B=1, H=3, G=1, T=300, D=5),  # several position blocks
    Case(pad=True, dtype=torch.float64),
    Case(gates="all_on", dtype=torch.float64),
    Case(pad=True, dtype=torch.bfloat16),
]


def test_dense_gated_is_the_definition():
    for c in (Case(T=9, pad=True), Case(H=4, G=1, T=7, gates="rows_off", dtype=torch.float64)):
        q, k, v, gates, km = make(c)
        close(dense_gated(q, k, v, gates, key_mask=km), naive_gated(q, k, v, gates, km),
              1e-12 if c.dtype == torch.float64 else 1e-5)
    q, k, v, gates, km = make(Case(T=9, dtype=torch.float64))
    close(dense_gated(q, k, v, gates, scale=0.3), naive_gated(q, k, v, gates, scale=0.3), 1e-12)


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
@pytest.mark.parametrize("block", [1, 8, 128])
def test_routed_torch_matches_dense(case: Case, block: int):
    q, k, v, gates, km = make(case)
    want = dense_gated(q, k, v, gates, key_mask=km)
    got = routed_torch(q, k, v, gates, key_mask=km, block=block)
    assert got.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    close(got, want, 1e-12 if case.dtype == torch.float64 else 1e-5)
    assert torch.all(got[gates == 0] == 0)


def test_unrouted_rows_and_unneeded_keys_are_never_read():
    """NaN in the queries of off rows, and in the keys / values past a group's last active position,
    poison the dense path (NaN · 0 = NaN) but not the routed ones: they never touch them."""
    c = Case(B=1, H=4, G=2, T=40, D=16)
    q, k, v, gates, _ = make(c)
    gates[0, 25:, :2] = 0.0  # group 0 has no active head after position 24
    gates[0, 30:, 2:] = 0.0  # group 1 none after 29
    clean = dense_gated(q, k, v, gates)
    q = q.masked_fill((gates == 0).permute(0, 2, 1)[..., None], float("nan"))
    k[0, 0, 25:] = v[0, 0, 25:] = float("nan")
    k[0, 1, 30:] = v[0, 1, 30:] = float("nan")
    assert torch.isnan(dense_gated(q, k, v, gates)).any()
    close(routed_torch(q, k, v, gates, block=8), clean, 1e-5)
    close(routed_triton(q, k, v, gates, block_m=16, block_n=16), clean, 1e-5)


TRITON_CASES = [
    Case(),
    Case(pad=True, D=24),  # D padded to 32
    Case(gates="all_on", T=40),  # several row blocks per (b, h)
    Case(gates="rows_off", pad=True),
    Case(gates="all_off"),
    Case(H=4, G=1, T=1, gates="all_on"),
    Case(H=4, G=4, gates="binary", pad=True),
    Case(pad=True, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c.id for c in TRITON_CASES])
def test_triton_matches_dense(case: Case):
    q, k, v, gates, km = make(case)
    want = dense_gated(q, k, v, gates, key_mask=km)
    got = routed_triton(q, k, v, gates, key_mask=km, block_m=16, block_n=16)
    assert got.dtype == torch.float32 and got.shape == (case.B, case.T, case.H, case.D)
    close(got, want, 1e-5)
    assert torch.all(got[gates == 0] == 0)


def test_triton_strided_inputs_and_default_blocks():
    c = Case(B=1, H=4, G=2, T=70, D=16, pad=True)
    q, k, v, gates, km = make(c)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, D] view of a [B, T, H, D] tensor
    gs = gates.transpose(1, 2).contiguous().transpose(1, 2)
    want = dense_gated(q, k, v, gates, key_mask=km)
    close(routed_triton(qs, k, v, gs, key_mask=km), want, 1e-5)
    close(routed_attention(qs, k, v, gs, key_mask=km, impl="triton"), want, 1e-5)


def test_packing_lists_active_rows_per_head_in_blocks():
    gates = torch.zeros(1, 5, 2)
    gates[0, [0, 2, 3, 4], 0] = 1.0  # head 0: tokens 0, 2, 3, 4
    gates[0, [1], 1] = 0.5  # head 1: token 1
    tok, blocks = pack_active_rows(gates, block_m=2)
    assert tok.tolist() == [0, 2, 3, 4, 1]
    # (b·H + h, first row, rows), heaviest (largest last position) first
    assert blocks.tolist() == [[0, 2, 2], [0, 0, 2], [1, 4, 1]]


def test_dispatch(monkeypatch):
    q, k, v, gates, km = make(Case(pad=True))
    routed = routed_torch(q, k, v, gates, key_mask=km)
    assert resolve_impl("auto", q) == "torch"  # CPU tensors
    assert torch.equal(routed_attention(q, k, v, gates, key_mask=km), routed)
    assert torch.equal(routed_attention(q, k, v, gates, key_mask=km, impl="torch"), routed)
    assert torch.equal(routed_attention(q, k, v, gates, key_mask=km, impl="reference"), routed)
    assert torch.equal(routed_attention(q, k, v, gates, key_mask=km, impl="dense"),
                       dense_gated(q, k, v, gates, key_mask=km))
    with pytest.raises(ValueError, match="impl must be"):
        routed_attention(q, k, v, gates, impl="cuda")
    with pytest.raises(ValueError, match="float64"):
        routed_attention(q.double(), k.double(), v.double(), gates, impl="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        routed_attention(q, k, v, gates, impl="triton")


def _bad_inputs():
    q, k, v, gates, _ = make(Case(B=2, H=6, G=2, T=5, D=4))
    km = torch.ones(2, 5, dtype=torch.bool)
    nan_gates = gates.clone()
    nan_gates[0, 1, 2] = float("nan")
    inf_gates = gates.clone()
    inf_gates[1, 0, 0] = float("inf")
    return [
        ("q 3-D", dict(q=q[0]), r"q must be 4-D \[B, H, T, D\]"),
        ("k 5-D", dict(k=k[None]), r"k must be 4-D"),
        ("int v", dict(v=v.long()), "v must be a floating-point"),
        ("k length", dict(k=k[:, :, :4], v=v[:, :, :4]), r"k .* does not fit q"),
        ("k batch", dict(k=k[:1], v=v[:1]), r"k .* does not fit q"),
        ("k head dim", dict(k=k[..., :3], v=v[..., :3]), r"k .* does not fit q"),
        ("v shape", dict(v=v[..., :3]), r"v must have k's shape"),
        ("H not a multiple of G", dict(k=torch.randn(2, 4, 5, 4), v=torch.randn(2, 4, 5, 4)),
         "H=6 is not a multiple of .* G=4"),
        ("gates [B, H, T]", dict(gates=gates.transpose(1, 2)), r"gates must be \[B, T, H\] = \[2, 5, 6\]"),
        ("gates 2-D", dict(gates=gates[0]), r"gates must be \[B, T, H\]"),
        ("int gates", dict(gates=gates.long()), "gates must be a floating-point"),
        ("NaN gate", dict(gates=nan_gates), "gates must be finite: 1 of 60"),
        ("inf gate", dict(gates=inf_gates), "gates must be finite"),
        ("key_mask shape", dict(key_mask=km[:, :4]), r"key_mask must be \[B, T\] = \[2, 5\]"),
        ("float key_mask", dict(key_mask=torch.ones(2, 5)), "key_mask must be a bool tensor"),
        ("gates on meta", dict(gates=gates.to("meta")), "must be on one device; got .*gates on meta"),
        ("list q", dict(q=q.tolist()), "q must be a torch.Tensor"),
        ("scale", dict(scale=float("nan")), "scale must be finite"),
    ], (q, k, v, gates)


BAD, GOOD = _bad_inputs()


@pytest.mark.parametrize("impl", ["torch", "dense", "triton"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(bad, impl):
    _, change, match = bad
    kw = dict(zip(("q", "k", "v", "gates"), GOOD))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        routed_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("gates"), impl=impl, **kw)


def test_bad_block_sizes():
    q, k, v, gates, _ = make(Case(T=5))
    with pytest.raises(ValueError, match="block must be a positive int"):
        routed_torch(q, k, v, gates, block=0)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        routed_triton(q, k, v, gates, block_m=24)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        routed_triton(q, k, v, gates, block_n=8)


# ------------------------------------------------------------------- the cost model


def test_costs_all_on_is_dense():
    gates = torch.rand(2, 7, 6) + 0.1
    c = routed_costs(gates, 2, 16)
    assert c["flops_ratio"] == 1.0 and c["active_fraction"] == 1.0
    assert c["kv_read_fraction"] == 1.0 and c["kv_read_key_fraction"] == 1.0
    assert c["dense_flops"] == c["routed_flops"] == 2 * 6 * 4 * 16 * sum(range(1, 8))
    assert c["n_pairs"] == c["n_active"] == 2 * 7 * 6 and c["kv_pairs"] == c["kv_reads"] == 2 * 7 * 2


def test_costs_half_off_hand_counted():
    # T=4, H=2 (one group), D=2; row cost 4·(t+1)·D = 8, 16, 24, 32
    gates = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.3, 2.0], [0.0, -1.0]]])  # 4 of 8 pairs on
    c = routed_costs(gates, 1, 2)
    assert c["dense_flops"] == 2 * (8 + 16 + 24 + 32) == 160
    assert c["routed_flops"] == 8 + 24 + 24 + 32 == 88
    assert c["flops_ratio"] == 88 / 160 and c["active_fraction"] == 0.5
    assert c["kv_reads"] == 3 and c["kv_read_fraction"] == 3 / 4  # token 1 reads nothing
    assert c["kv_read_key_fraction"] == (1 + 3 + 4) / (1 + 2 + 3 + 4)
    # left padding of one token: it is no query, and real token t sees t real keys (costs 8, 16, 24)
    c = routed_costs(gates, 1, 2, key_mask=torch.tensor([[False, True, True, True]]))
    assert c["dense_flops"] == 2 * (8 + 16 + 24) and c["routed_flops"] == 16 + 16 + 24
    assert c["n_pairs"] == 6 and c["n_active"] == 3 and c["kv_pairs"] == 3 and c["kv_reads"] == 2


def test_costs_gqa_kv_reads_hand_made():
    # H=4: with G=2, heads 0, 1 read group 0 and heads 2, 3 group 1
    gates = torch.tensor([[[1.0, 0.0, 0.0, 0.0],  # t0: group 0 only
                           [0.0, 0.0, 0.0, 0.0],  # t1: nothing
                           [0.0, 1.0, 1.0, 0.0]]])  # t2: one head of each group -> both read
    c = routed_costs(gates, 2, 8)
    assert c["kv_pairs"] == 6 and c["kv_reads"] == 3 and c["kv_read_fraction"] == 0.5
    assert c["kv_read_key_fraction"] == (1 * 1 + 2 * 3) / (2 * (1 + 2 + 3))  # keys read: 1 at t0, 3 twice at t2
    assert routed_costs(gates, 1, 8)["kv_reads"] == 2  # multi-query: read whenever any head is on
    assert routed_costs(gates, 4, 8)["kv_reads"] == 3  # multi-head: one read per active head
    assert c["active_fraction"] == 3 / 12
    assert c["routed_flops"] == 4 * 8 * (1 + 3 + 3)


def test_costs_exactly_k_of_h_heads_per_token():
    gen = torch.Generator().manual_seed(0)
    B, T, H = 2, 50, 9
    idx = torch.rand(B, T, H, generator=gen).argsort(-1)[..., :4]
    gates = torch.zeros(B, T, H).scatter_(-1, idx, 1.0)
    c = routed_costs(gates, 3, 64)
    assert c["active_fraction"] == 4 / 9 and c["flops_ratio"] == pytest.approx(4 / 9, rel=1e-15)
    assert 1 / 3 <= c["kv_read_fraction"] <= 1.0


def test_costs_bad_inputs():
    with pytest.raises(ValueError, match=r"gates must be a tensor \[B, T, H\]"):
        routed_costs(torch.ones(3, 4), 1, 8)
    with pytest.raises(ValueError, match="dividing the number of heads H=6"):
        routed_costs(torch.ones(1, 3, 6), 4, 8)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        routed_costs(torch.ones(1, 3, 6), 2, 0)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[B, T\] = \[1, 3\]"):
        routed_costs(torch.ones(1, 3, 6), 2, 8, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        routed_costs(torch.full((1, 3, 6), float("nan")), 2, 8)


def test_benchmark_quick_run():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "moh.py"
    spec = importlib.util.spec_from_file_location("_moh_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = mod.main(["--quick", "--device", "cpu"])  # writes no file
    rows = [line.split() for line in lines if not line.startswith("#")][1:]  # past the column names
    assert len(rows) == 4 and {r[1] for r in rows} == {"4/9", "9/9"}
    assert all(float(r[-1]) < 1e-5 for r in rows)  # max |routed - dense|
    assert [float(r[2]) for r in rows if r[1] == "9/9"] == [1.0, 1.0]  # FLOPs ratio with every head on
