"""RazorKV, the per-head KV-cache policy: its attention against a direct reference, and its accounting."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import headlab as hl
from conftest import VOCAB
from headlab.capture import LayerRecord
from headlab.edits.kv_policy import DecodeOnly, RazorKV


@pytest.fixture(scope="module")
def llama(tiny_folder):
    return hl.load(tiny_folder("llama"), device="cpu")  # 2 layers, 4 query heads, 2 KV heads


def _reference(record: LayerRecord, heads, policy: RazorKV) -> torch.Tensor:
    """Row by row: softmax over the kept keys and one compensation token (mean k, v; logit + log|D|)."""
    B, H, Q, D = record.q.shape
    S = record.k.shape[2]
    out = torch.zeros(B, Q, len(heads), D)
    for i in range(Q):
        pos = S - Q + i
        if policy.compress_at is None:
            length = max(policy.window, math.ceil(policy.window_frac * (pos + 1)))
            lo, hi = policy.sinks, max(policy.sinks, pos + 1 - length)
        elif pos >= policy.compress_at:
            lo = policy.sinks
            hi = max(lo, policy.compress_at - policy.window_for(policy.compress_at))
        else:
            lo = hi = policy.sinks
        kept = [j for j in range(pos + 1) if not lo <= j < hi]
        for n, h in enumerate(heads):
            g = h // (H // record.k.shape[1])
            q, k, v = record.q[:, h, i].double(), record.k[:, g].double(), record.v[:, g].double()
            logits = (k[:, kept] @ q[:, :, None])[..., 0] * record.scale  # [B, kept]
            values = v[:, kept]
            if policy.compensation and hi > lo:
                k_hat, v_hat = k[:, lo:hi].mean(1), v[:, lo:hi].mean(1)
                comp = (k_hat * q).sum(-1) * record.scale + math.log(hi - lo)
                logits = torch.cat([logits, comp[:, None]], 1)
                values = torch.cat([values, v_hat[:, None]], 1)
            out[:, i, n] = (torch.softmax(logits, -1)[:, None] @ values)[:, 0].float()
    return out


@pytest.mark.parametrize("compress_at", [None, 9], ids=["sliding", "compress9"])
@pytest.mark.parametrize("compensation", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("window_frac", [0.0, 0.4], ids=["fixed", "frac"])
def test_attend_matches_a_row_by_row_reference(compress_at, compensation, window_frac):
    gen = torch.Generator().manual_seed(0)
    B, H, G, Q, S, D = 2, 4, 2, 7, 19, 8
    record = LayerRecord(layer=0, q=torch.randn(B, H, Q, D, generator=gen), k=torch.randn(B, G, S, D, generator=gen),
                         v=torch.randn(B, G, S, D, generator=gen), mask=None, causal=True, scale=D**-0.5)
    policy = RazorKV(sinks=2, window=3, window_frac=window_frac, compensation=compensation, compress_at=compress_at,
                     block=3)
    heads = (0, 1, 3)
    got, _ = policy.attend(record, heads)
    assert got.shape == (B, Q, len(heads), D)
    assert (got - _reference(record, heads, policy)).abs().max() < 1e-5


def _ids(n=23, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_a_window_covering_everything_changes_nothing(llama):
    ids = _ids()
    with torch.no_grad():
        clean = llama.hf(ids).logits
        with hl.edit(llama, RazorKV(sinks=4, window=64)):
            got = llama.hf(ids).logits
    assert (got - clean).abs().max() < 1e-5


def test_one_dropped_token_is_recovered_exactly_by_the_compensation_token(llama):
    """With |D| = 1 the compensation token is the dropped key itself (log 1 = 0): decoding is unchanged."""
    ids = _ids()
    prefill = ids.shape[1] - 1
    with torch.no_grad():
        _, cache = llama.forward_cached(ids[:, :-1])
        clean, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
        with hl.edit(llama, RazorKV(sinks=2, window=prefill - 3, compress_at=prefill)):
            exact, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
        with hl.edit(llama, RazorKV(sinks=2, window=prefill - 6, compress_at=prefill)):
            lossy, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
    assert (exact - clean).abs().max() < 1e-5
    assert (lossy - clean).abs().max() > 1e-4


def test_rows_before_compression_see_the_full_context(llama):
    ids = _ids()
    with torch.no_grad():
        clean = llama.hf(ids).logits
        with hl.edit(llama, RazorKV(sinks=1, window=2, compress_at=ids.shape[1])):
            got = llama.hf(ids).logits
        with hl.edit(llama, RazorKV(sinks=1, window=2, compress_at=10)):
            late = llama.hf(ids).logits
    assert (got - clean).abs().max() < 1e-5
    assert (late[:, :10] - clean[:, :10]).abs().max() < 1e-5
    assert (late[:, 10:] - clean[:, 10:]).abs().max() > 1e-4


def test_full_kv_heads_are_left_to_the_backend(llama):
    ops = RazorKV(full=frozenset({(0, 1), (1, 0), (1, 1)}), window=2).layer_ops(llama)
    assert list(ops) == [0]
    assert ops[0].overrides[0].heads == (0, 1)  # query heads 0, 1 read KV head 0
    with pytest.raises(hl.EditError):
        RazorKV(full=frozenset({(0, 2)})).layer_ops(llama)
    with pytest.raises(hl.EditError):
        RazorKV(window=0)


def test_cache_fraction_counts_sinks_window_compensation_and_decoded_tokens(llama):
    policy = RazorKV(full=frozenset({(0, 0)}), sinks=4, window=10, compress_at=100)
    kv = policy.cache_fraction(llama, 120)
    kept = 120 + 3 * (4 + 10 + 1 + 20)  # one full KV head; three at sinks + window + compensation + 20 decoded
    assert kv["kept_entries"] == kept and kv["full_entries"] == 4 * 120
    assert kv["fraction"] == pytest.approx(kept / 480)
    assert kv["kept_bytes"] == kept * 2 * llama.head_dim * 4
    assert RazorKV(window=10, window_frac=0.2).window_for(100) == 20
    assert RazorKV(sinks=4, window=10).kept_tokens(12) == 12  # nothing dropped yet, no compensation token


def test_decode_only_edits_leave_prefill_alone_and_act_on_decode_steps(llama):
    ids = _ids()
    edits = [hl.Ablate(hl.HeadRef(1, 2), how="uniform"), hl.Ablate(hl.HeadRef(0, 1)),
             hl.Scale(hl.HeadRef(0, 3), factor=0.5)]
    with torch.no_grad():
        clean_prefill = llama.hf(ids[:, :-1]).logits
        _, cache = llama.forward_cached(ids[:, :-1])
        clean, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
        with hl.edit(llama, edits):
            edited, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
        with hl.edit(llama, DecodeOnly(tuple(edits))):
            prefill = llama.hf(ids[:, :-1]).logits
            decoded, _ = llama.forward_cached(ids[:, -1:], copy.deepcopy(cache))
    assert (prefill - clean_prefill).abs().max() < 1e-5
    assert (decoded - edited).abs().max() < 1e-5
    assert (decoded - clean).abs().max() > 1e-4
