"""Statistics at the cost of what they need: the row lse rides on the attention call the model makes.

On the CPU, sdpa runs ATen's flash kernel, which returns each row's log-sum-exp with the output; the seam calls it
directly when a capture asks for the lse. The model's output must stay bit-identical and the lse must equal the
materialised definition, on every family, with padding, GQA and a sliding window. Statistics beyond the lse come
from headlab's compiled kernel in the same sweep ("kernel" route), or, where it is not built, from extra columns of
the flash call and one more swapped flash call ("flash" route): both are checked.
"""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from conftest import FAMILIES, tiny_config
from headlab.analyses.induction import _reduce, repeated_tokens
from headlab_kernels.head_stats import cpu, head_stats_materialised
from headlab_kernels.head_stats.fused import attention_with_lse, attention_with_stats


@pytest.fixture(params=["kernel", "flash", "triton"])
def route(request, monkeypatch):
    """Each fused route in turn: "flash" is what runs where the compiled kernel is not built; "triton" is CUDA's
    (here through Triton's interpreter, asked for by name)."""
    if request.param == "flash":
        monkeypatch.setattr(cpu, "load", lambda verbose=False: None)
    elif request.param == "kernel":
        assert cpu.load() is not None, cpu.unavailable()
    return request.param


def _asked(route: str) -> str:
    """The `route=` that makes `route` run on this machine."""
    return "triton" if route == "triton" else "auto"


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_output_is_sdpa_and_lse_is_the_definition(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, 16) for _ in range(3))
    mask = None if causal else torch.rand(2, 1, 29, 29) > 0.3
    if mask is not None:
        mask[..., 0] = True  # every row sees a key
    out, lse = attention_with_lse(q, k, v, mask=mask, causal=causal, scale=0.3)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                             is_causal=causal, scale=0.3))
    ref = head_stats_materialised(q, k, scale=0.3, causal=causal, topk=1, mask=mask)
    assert torch.allclose(lse, ref["lse"].float(), atol=1e-5)
    assert attention_with_lse(q, k, v, mask=None, causal=True, scale=None, dropout=0.1) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_bit_identical_and_lse_exact_on_every_family(family):
    cls, cfg = tiny_config(family)
    if family == "mistral":
        cfg.sliding_window = 5  # the model's own mask carries the window
    torch.manual_seed(0)
    m = hl.load(cls(cfg).eval(), device="cpu")
    ids = [[5, 9, 3, 7, 2, 8, 5, 9, 3, 7, 2, 8], [4, 6, 1, 3, 3, 9, 5]]  # the second is padded
    full, fused = m.stats(ids, impl="torch"), m.stats(ids, statistics="lse")
    assert set(fused.paths.values()) == {"fused-lse"} and set(full.paths.values()) == {"reference"}
    key = "logits" if getattr(full.output, "logits", None) is not None else "last_hidden_state"
    real = m.encode(ids).attention_mask.bool()
    a, b = getattr(full.output, key), getattr(fused.output, key)
    assert torch.equal(a[real], b[real])
    for layer in full.layers:
        d = (full.layers[layer].lse - fused.layers[layer].lse)[real[:, None].expand_as(fused.layers[layer].lse)]
        assert d.abs().max() < 1e-5
        assert torch.isinf(fused.layers[layer].lse[~real[:, None].expand_as(fused.layers[layer].lse)]).all()


def test_key_sets_and_linear_layers_take_the_full_route():
    twin = hl.load("twin-recall-based", device="cpu")  # swa (softmax) + based (linear)
    ids = [[0, *range(1, 21), *range(1, 21)]]
    run = twin.stats(ids, statistics="lse")
    assert run.paths == {0: "fused-lse", 1: "implicit"}
    sets = {"first": torch.zeros(1, 41, dtype=torch.bool)}
    assert set(twin.stats(ids, statistics="lse", key_sets=sets).paths.values()) == {"reference", "implicit"}
    with pytest.raises(ValueError, match="statistics"):
        twin.stats(ids, statistics="pattern")
    with pytest.raises(ValueError, match="no key_sets"):
        twin.stats(ids, statistics={"key_sets"})
    assert twin.stats(ids, statistics={"entropy"}).paths == {0: "kernel-lse+entropy", 1: "implicit"}
    assert twin.stats(ids, statistics={"topk"}, topk=2).paths == {0: "kernel-lse+topk", 1: "implicit"}


def test_without_the_compiled_kernel_the_flash_route_and_the_full_route_answer(monkeypatch):
    monkeypatch.setattr(cpu, "load", lambda verbose=False: None)
    twin = hl.load("twin-recall-based", device="cpu")
    ids = [[0, *range(1, 21), *range(1, 21)]]
    assert twin.stats(ids, statistics={"entropy"}).paths == {0: "fused-lse+entropy", 1: "implicit"}
    assert twin.stats(ids, statistics={"topk"}).paths == {0: "reference", 1: "implicit"}  # top keys need q, k


def test_induction_scan_scores_equal_either_route():
    m = hl.load("toy-induction", device="cpu")
    toks = repeated_tokens(m, seq_len=40, batch=3)
    full = m.stats(toks, impl="torch", reducer=lambda r, s: _reduce(r, s, 40))
    fused = m.stats(toks, statistics="lse", reducer=lambda r, s: _reduce(r, s, 40))
    for layer in full.extra:
        for key in full.extra[layer]:
            assert torch.allclose(full.extra[layer][key], fused.extra[layer][key], atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False], ids=["set-keys-from-lse", "indicator-columns"])
@pytest.mark.parametrize("causal", [True, False])
def test_stats_kernel_equals_the_materialised_definition(causal, sparse, route, monkeypatch):
    import headlab_kernels.head_stats.fused as fused

    monkeypatch.setattr(fused, "SPARSE_SETS", 128 if sparse else 0)
    torch.manual_seed(1)
    n_b, n_h, n_t, d = 2, 3, 33, 16
    q, k, v = (torch.randn(n_b, n_h, n_t, d) for _ in range(3))
    real = torch.ones(n_b, n_t, dtype=torch.bool)
    real[1, :6] = False  # left padding in the second row
    mask = None if causal else torch.ones(n_t, n_t).tril().bool()[None, None] & real[:, None, None, :]
    sets = torch.zeros(2, n_b, n_t, dtype=torch.bool)
    sets[0, :, 0] = sets[1, :, 9:13] = True
    res = attention_with_stats(q, k, v, mask=mask, causal=causal, scale=0.25, entropy=True, key_sets=sets,
                               received=True, query_mask=None if causal else real, route=_asked(route))
    assert res.route == route
    out, st = res.out, res.stats
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                is_causal=causal, scale=0.25),
                          atol=1e-6)
    ref = head_stats_materialised(q, k, scale=0.25, causal=True, topk=1, key_sets=sets,
                                  key_mask=None if causal else real)
    rows = (real if not causal else torch.ones_like(real))[:, None]  # [B, 1, T]
    for name, got in (("lse", st["lse"]), ("entropy", st["entropy"])):
        assert (got - ref[name].float())[rows.expand_as(got)].abs().max() < 1e-5, name
    assert (st["set_mass"] - ref["set_mass"].float())[rows[..., None].expand_as(st["set_mass"])].abs().max() < 1e-5
    assert (st["received"] - ref["received"].float())[rows.expand_as(st["received"])].abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_statistics_equal_the_full_route_on_every_family(family, route):
    cls, cfg = tiny_config(family)
    if family == "mistral":
        cfg.sliding_window = 5  # the model's own mask carries the window: the swapped call reads it transposed
    torch.manual_seed(0)
    m = hl.load(cls(cfg).eval(), device="cpu")
    ids = [[5, 9, 3, 7, 2, 8, 5, 9, 3, 7, 2, 8], [4, 6, 1, 3, 3, 9, 5]]  # the second is padded
    n_s = m.encode(ids).input_ids.shape[1]
    sets = {"first": torch.zeros(2, n_s, dtype=torch.bool), "mid": torch.zeros(2, n_s, dtype=torch.bool)}
    sets["first"][:, 0] = True
    sets["mid"][:, 3:6] = True
    full = m.stats(ids, key_sets=sets, topk=2, impl="torch")  # the full route: the chunked torch reference
    asked = {"entropy", "received", "key_sets"} | ({"topk"} if route != "flash" else set())
    fast = m.stats(ids, key_sets=sets, statistics=asked, topk=2, route=_asked(route))
    want = {"kernel": "kernel-lse+entropy+key_sets+received+topk", "flash": "fused-lse+entropy+key_sets+received",
            "triton": "triton-lse+entropy+key_sets+received+topk"}[route]
    assert set(fast.paths.values()) == {want}
    real = m.encode(ids).attention_mask.bool()
    key = "logits" if getattr(full.output, "logits", None) is not None else "last_hidden_state"
    assert torch.allclose(getattr(full.output, key)[real], getattr(fast.output, key)[real], atol=1e-5)
    for layer in full.layers:
        a, b = full.layers[layer], fast.layers[layer]
        rows = real[:, None].expand_as(a.lse)
        assert (a.lse - b.lse)[rows].abs().max() < 1e-5
        assert (a.entropy - b.entropy)[rows].abs().max() < 1e-4
        assert (a.set_mass - b.set_mass)[rows].abs().max() < 1e-5 and b.set_names == ("first", "mid")
        assert (a.received - b.received).abs().max() < 1e-4
        assert torch.equal(a.n_visible, b.n_visible)
        if route != "flash":  # the weights agree; the keys wherever the two are not tied
            assert (a.topk_weight - b.topk_weight)[rows].abs().max() < 1e-5
            firm = rows[..., None] & ((a.topk_weight[..., :1] - a.topk_weight[..., 1:]).abs() > 1e-5)[..., [0, 0]]
            assert torch.equal(a.topk_idx[firm], b.topk_idx[firm])
        else:
            assert b.topk_idx.shape[-1] == 0  # the flash route has no top keys
    every = m.stats(ids, key_sets=sets, topk=2, route=_asked(route))  # "all": the one-sweep kernel where built
    assert set(every.paths.values()) == {"flash": {"reference"}}.get(route, {want})
    for layer in full.layers:
        a, b = full.layers[layer], every.layers[layer]
        assert (a.received - b.received).abs().max() < 1e-4 and (a.topk_weight - b.topk_weight).abs().max() < 1e-5
    sinks = m.stats(ids, statistics={"received"})
    assert torch.isnan(sinks.layers[0].entropy).all() and not torch.isnan(sinks.layers[0].received).any()
