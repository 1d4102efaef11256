"""Statistics at the cost of what they need: the row lse rides on the attention call the model makes.

On the CPU, sdpa runs ATen's flash kernel, which returns each row's log-sum-exp with the output; the seam calls it
directly when a capture asks for the lse. The model's output must stay bit-identical and the lse must equal the
materialised definition, on every family, with padding, GQA and a sliding window.
"""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from conftest import FAMILIES, tiny_config
from headlab.analyses.induction import _reduce, repeated_tokens
from headlab_kernels.head_stats import head_stats_materialised
from headlab_kernels.head_stats.fused import attention_with_lse


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
    full, fused = m.stats(ids), m.stats(ids, statistics="lse")
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
        twin.stats(ids, statistics="entropy")


def test_induction_scan_scores_equal_either_route():
    m = hl.load("toy-induction", device="cpu")
    toks = repeated_tokens(m, seq_len=40, batch=3)
    full = m.stats(toks, reducer=lambda r, s: _reduce(r, s, 40))
    fused = m.stats(toks, statistics="lse", reducer=lambda r, s: _reduce(r, s, 40))
    for layer in full.extra:
        for key in full.extra[layer]:
            assert torch.allclose(full.extra[layer][key], fused.extra[layer][key], atol=1e-6)
