"""headlab's compiled CPU kernel: output, lse, entropy, top-k, key-set masses and received attention in one sweep.

It is built with the machine's compiler on first use (`make install` builds it). Every statistic is checked against
the materialised float64 definition (`head_stats_materialised`) and the output against sdpa, with GQA, causal
bottom-right alignment (S > Q), bool masks broadcast over batch or heads, left padding (rows that see no key),
strided inputs and blocks that do not divide the sequence.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from headlab_kernels.head_stats import cpu, head_stats_materialised
from headlab_kernels.head_stats.fused import attention_with_stats


def test_the_kernel_builds_where_a_compiler_is_found():
    mod = cpu.load()
    if shutil.which("c++") or shutil.which("g++"):
        assert mod is not None, cpu.unavailable()  # CI has a compiler: a failed build must not hide as a skip
        assert cpu.build_dir().is_dir()
    else:
        assert mod is None and "compiler" in cpu.unavailable()


def _definition(q, k, *, scale, causal, mask, sets, topk):
    """`head_stats_materialised`, head by head where the mask differs between heads."""
    if mask is None or mask.shape[1] == 1:
        return head_stats_materialised(q, k, scale=scale, causal=causal, topk=topk, mask=mask, key_sets=sets)
    rep = q.shape[1] // k.shape[1]
    parts = [head_stats_materialised(q[:, h:h + 1], k[:, h // rep:h // rep + 1], scale=scale, causal=causal, topk=topk,
                                     mask=mask[:, h:h + 1], key_sets=sets) for h in range(q.shape[1])]
    return {name: torch.cat([p[name] for p in parts], 1) for name in ("lse", "entropy", "received", "set_mass",
                                                                    "top_w", "top_i")}


def _inputs(n_b, n_h, n_g, n_q, n_s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_b, n_q, n_h, d, generator=g).transpose(1, 2) * 1.3  # strided, as the model's projections are
    k = torch.randn(n_b, n_g, n_s, d, generator=g) * 1.3
    v = torch.randn(n_b, n_s, n_g, d, generator=g).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("case", ["causal", "causal-cached", "mask-batch", "mask-heads", "padded", "window"])
@pytest.mark.parametrize("block_q", [1, 7, 64])
def test_every_statistic_equals_the_materialised_definition(case, block_q):
    assert cpu.load() is not None, cpu.unavailable()
    n_b, n_h, n_g, d = 2, 6, 2, 16
    n_q = 37
    n_s = 45 if case == "causal-cached" else n_q
    q, k, v = _inputs(n_b, n_h, n_g, n_q, n_s, d)
    mask = real = None
    causal = case.startswith("causal")
    if case == "mask-batch":  # a random bool mask per batch row, shared by the heads
        mask = torch.rand(n_b, 1, n_q, n_s, generator=torch.Generator().manual_seed(3)) > 0.4
    elif case == "mask-heads":  # one mask per head, shared by the batch
        mask = torch.rand(1, n_h, n_q, n_s, generator=torch.Generator().manual_seed(4)) > 0.4
    elif case == "padded":  # left padding: the padded rows see no key at all
        real = torch.ones(n_b, n_q, dtype=torch.bool)
        real[1, :9] = False
        mask = torch.ones(n_q, n_s).tril().bool()[None, None] & real[:, None, None, :]
    elif case == "window":  # a sliding window of 5 keys and left padding: each block sees a range not starting at 0
        real = torch.ones(n_b, n_q, dtype=torch.bool)
        real[0, :3] = False
        pos = torch.arange(n_q)
        near = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 5)
        mask = near[None, None] & real[:, None, None, :]
    sets = torch.zeros(3, n_b, n_s, dtype=torch.bool)
    sets[0, :, 0] = True
    sets[1, :, 5:12] = True
    sets[2] = torch.rand(n_b, n_s, generator=torch.Generator().manual_seed(5)) > 0.5
    scale = 0.31
    out, st = cpu.attention_stats(q, k, v, mask=mask, causal=causal, scale=scale, entropy=True, topk=3,
                                  features=sets.permute(1, 2, 0).float(), received=True, query_mask=real,
                                  block_q=block_q)
    kk, vv = (x.repeat_interleave(n_h // n_g, 1) for x in (k, v))
    sdpa_mask = mask if not causal else torch.ones(n_q, n_s).tril(n_s - n_q).bool()  # bottom-right causal
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=sdpa_mask, scale=scale)
    ref = _definition(q, k, scale=scale, causal=causal, mask=mask, sets=sets, topk=3)
    seen = torch.isfinite(ref["lse"])  # rows that see some key
    got_out = out.transpose(1, 2)
    assert (got_out - want.nan_to_num(0.0))[seen].abs().max() < 1e-5
    assert torch.equal(torch.isinf(st["lse"]), ~seen) and (got_out[~seen] == 0).all()
    assert (st["lse"] - ref["lse"].float())[seen].abs().max() < 1e-5
    assert (st["entropy"] - ref["entropy"].float()).abs().max() < 1e-5
    assert (st["set_mass"] - ref["set_mass"].float())[seen].abs().max() < 1e-5
    assert (st["received"] - ref["received"].float()).abs().max() < 1e-4
    # top-k: the weights in order; the indices where the next weight is not a tie
    assert (st["topk_weight"] - ref["top_w"][..., :3].float()).abs().max() < 1e-5
    distinct = (ref["top_w"][..., :3] - ref["top_w"][..., 1:4]).abs() > 1e-6
    firm = distinct & torch.cat([torch.ones_like(distinct[..., :1]), distinct[..., :-1]], -1) & seen[..., None]
    assert torch.equal(st["topk_idx"][firm], ref["top_i"][..., :3][firm])
    assert (st["topk_idx"][~seen] == -1).all()


def test_a_row_with_fewer_visible_keys_than_k_pads_its_top_keys():
    q, k, v = _inputs(1, 2, 1, 5, 5, 8)
    _, st = cpu.attention_stats(q, k, v, causal=True, scale=0.3, topk=4)
    assert st["topk_idx"][0, :, 0].tolist() == [[0, -1, -1, -1]] * 2  # query 0 sees key 0 only
    assert torch.allclose(st["topk_weight"][0, :, 0], torch.tensor([1.0, 0, 0, 0]).expand(2, 4))
    assert (st["topk_idx"][0, :, 4] >= 0).all()


def test_the_dispatcher_takes_the_kernel_only_for_more_than_the_lse():
    q, k, v = _inputs(1, 4, 2, 20, 20, 8)
    lse_only = attention_with_stats(q, k, v, mask=None, causal=True, scale=None)
    assert lse_only.route == "flash"  # the output then stays bit-identical to sdpa's
    more = attention_with_stats(q, k, v, mask=None, causal=True, scale=None, entropy=True, topk=2)
    assert more.route == "kernel"
    assert torch.allclose(more.out, lse_only.out, atol=1e-6) and torch.allclose(more.stats["lse"],
                                                                                lse_only.stats["lse"], atol=1e-5)
    forced = attention_with_stats(q, k, v, mask=None, causal=True, scale=None, route="kernel")
    assert forced.route == "kernel"
    # what the kernel cannot take goes to the flash route (or nowhere, for top-k)
    bias = torch.randn(1, 1, 20, 20)  # a real additive bias, not a mask
    assert attention_with_stats(q, k, v, mask=bias, causal=False, scale=None, entropy=True).route == "flash"
    assert attention_with_stats(q, k, v, mask=bias, causal=False, scale=None, topk=1) is None
    half = attention_with_stats(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=None, causal=True, scale=None,
                                entropy=True)  # computed in float32, the output rounded back
    assert half.route == "kernel" and half.out.dtype == torch.bfloat16
    want = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16().repeat_interleave(2, 1),
                                                            v.bfloat16().repeat_interleave(2, 1), is_causal=True)
    assert (half.out.float() - want.float()).abs().max() < 2e-2
    double = attention_with_stats(q.double(), k.double(), v.double(), mask=None, causal=True, scale=None,
                                  entropy=True)
    assert double.route == "flash"
    with pytest.raises(ValueError, match="route"):
        attention_with_stats(q, k, v, mask=None, causal=True, scale=None, route="fast")


def test_without_the_kernel_the_flash_route_answers(monkeypatch):
    monkeypatch.setattr(cpu, "load", lambda verbose=False: None)
    q, k, v = _inputs(1, 4, 2, 20, 20, 8)
    res = attention_with_stats(q, k, v, mask=None, causal=True, scale=None, entropy=True, received=True)
    assert res.route == "flash" and set(res.stats) == {"lse", "entropy", "received"}
    assert attention_with_stats(q, k, v, mask=None, causal=True, scale=None, topk=1) is None
    assert attention_with_stats(q, k, v, mask=None, causal=True, scale=None, route="kernel") is None


def test_bad_inputs_get_errors_that_name_them():
    q, k, v = _inputs(1, 4, 2, 10, 10, 8)
    mod = cpu.load()
    with pytest.raises(RuntimeError, match="float32"):
        mod.attention_stats(q.double(), k, v, None, True, 0.3, False, 0, None, False, None, 16)
    with pytest.raises(RuntimeError, match="do not fit"):
        mod.attention_stats(q, k[:, :, :, :4], v, None, True, 0.3, False, 0, None, False, None, 16)
    with pytest.raises(RuntimeError, match="mask"):
        mod.attention_stats(q, k, v, torch.ones(1, 1, 10, 9, dtype=torch.bool), False, 0.3, False, 0, None, False,
                            None, 16)


def test_threads_split_the_work_without_changing_the_answer():
    """Blocks go to threads in ranges; each thread sums received attention in its own row, added at the end."""
    q, k, v = _inputs(2, 6, 3, 150, 150, 16, seed=7)
    kwargs = dict(causal=True, scale=0.25, entropy=True, topk=2, received=True, block_q=16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.attention_stats(q, k, v, **kwargs)
        torch.set_num_threads(2)
        two = cpu.attention_stats(q, k, v, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one[0], two[0], atol=1e-6)
    for name in one[1]:
        assert torch.allclose(one[1][name].float(), two[1][name].float(), atol=1e-5), name
