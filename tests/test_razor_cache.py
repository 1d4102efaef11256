"""RazorCache, RazorAttention's policy as a real cache: the same decode as the RazorKV edit over a full cache, only
the kept entries in memory, honest patterns, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import headlab as hl
from conftest import VOCAB
from headlab.analyses.razor import Condition, razor_conditions
from headlab.analyses.retrieval import NeedlePrompt, run_trial
from headlab.edits import RazorCache, RazorKV
from headlab.errors import EditError

FAMILIES = ["llama", "gpt2", "qwen2"]


@pytest.fixture(scope="module")
def models(tiny_folder):
    return {f: hl.load(tiny_folder(f), device="cpu") for f in FAMILIES}


def _ids(n=29, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, cache, first: int, steps: int, edits=()) -> tuple[list[torch.Tensor], object]:
    out, token = [], first
    with torch.no_grad(), hl.edit(model, list(edits)):
        for _ in range(steps):
            logits, cache = model.forward_cached(torch.tensor([[token]]), cache)
            out.append(logits)
            token = int(logits.argmax())
    return out, cache


def _policies(model):
    every = frozenset((l, g) for l in range(model.n_layers) for g in range(model.n_kv_heads))
    some = frozenset({(0, 0), (1, model.n_kv_heads - 1)})
    return [RazorKV(full=frozenset(), sinks=2, window=5), RazorKV(full=some, sinks=2, window=5),
            RazorKV(full=some, sinks=3, window=4, compensation=False), RazorKV(full=some, sinks=1, window=3,
                                                                                 window_frac=0.25),
            RazorKV(full=every, sinks=2, window=5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_real_cache_decodes_like_the_edit_over_a_full_cache(models, family):
    model = models[family]
    ids = _ids()
    prefill = ids.shape[1] - 1
    with torch.no_grad():
        _, full = model.forward_cached(ids[:, :-1])
    for policy in _policies(model):
        edit = RazorKV(full=policy.full, sinks=policy.sinks, window=policy.window, window_frac=policy.window_frac,
                       compensation=policy.compensation, compress_at=prefill)
        want, _ = _decode(model, copy.deepcopy(full), int(ids[0, -1]), 6, [edit])
        with torch.no_grad():
            _, real = model.forward_cached(ids[:, :-1], policy.cache(model))  # prefill into it: compressed after
        got, real = _decode(model, real, int(ids[0, -1]), 6)
        err = max(float((a - b).abs().max()) for a, b in zip(want, got))
        assert err < 1e-4, (family, policy, err)
        adopted, _ = _decode(model, RazorCache.from_cache(model, policy, copy.deepcopy(full)), int(ids[0, -1]), 6)
        assert max(float((a - b).abs().max()) for a, b in zip(got, adopted)) < 1e-5
        assert real.get_seq_length() == ids.shape[1] - 1 + 6  # positions: every token seen, none forgotten


def test_memory_holds_only_the_kept_entries(models):
    model = models["llama"]  # 2 layers × 2 KV heads, head size 8
    ids = _ids(41)
    policy = RazorKV(full=frozenset({(0, 1)}), sinks=2, window=5)
    with torch.no_grad():
        _, cache = model.forward_cached(ids, policy.cache(model))
    # after the prompt of 41 tokens, layer 0 (the last one compressed when layer 1 updated) is compressed; layer 1
    # compresses at the next update
    assert cache.layers[0].done and not cache.layers[1].done
    _, cache = _decode(model, cache, 5, 3)
    n = 41 + 3
    kept = 2 + 1 + 5 + 3  # sinks, compensation, window, decoded
    assert cache.fraction()["kept_entries"] == (n + kept) + 2 * kept  # layer 0: one full head; layer 1: none full
    per_entry = 2 * model.head_dim * 4  # key + value, float32
    assert cache.nbytes() == cache.fraction()["kept_entries"] * per_entry
    assert cache.fraction()["fraction"] == pytest.approx(((n + kept) + 2 * kept) / (2 * 2 * n))


def test_patterns_recorded_under_the_real_cache_are_the_compressed_ones(models):
    model = models["llama"]
    ids = _ids()
    policy = RazorKV(full=frozenset({(1, 0)}), sinks=2, window=4)
    with torch.no_grad():
        _, cache = model.forward_cached(ids[:, :-1], policy.cache(model))
        with model.capturing(with_z=True) as cap:
            model.forward_cached(ids[:, -1:], cache)
    for layer, rec in cap.records.items():
        assert rec.key_bias is not None
        pattern = rec.pattern()  # [1, H, 1, S]
        assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), atol=1e-5)
        groups = torch.arange(model.n_heads) // (model.n_heads // model.n_kv_heads)
        v = rec.v.float().index_select(1, groups)  # [1, H, S, D]
        z = torch.matmul(pattern, v).transpose(1, 2)  # [1, 1, H, D]
        assert (z - rec.z.float()).abs().max() < 1e-5, layer
        hidden = (torch.isinf(rec.key_bias) & (rec.key_bias < 0)).index_select(1, groups)  # padding slots
        assert float(pattern.masked_fill(~hidden, 0.0).abs().sum()) == 0.0
        if layer == 1:  # one KV head full, one compressed: the compressed one's key set is padded
            assert bool(hidden.any())


def test_needle_trials_with_the_real_cache_reply_as_the_simulated_policy(models):
    model = models["llama"]
    ids = tuple(_ids(40, seed=3)[0].tolist())
    prompt = NeedlePrompt(ids, (10, 14), tuple(ids[10:14]))
    conditions = razor_conditions(frozenset({(0, 0)}), [6], sinks=2, kv_cache="both")
    records = {r["condition"]: r for r in run_trial(model, prompt, conditions, max_new_tokens=8)}
    for name in ("razor-w6", "window-w6"):
        assert records[name]["generated"] == records[f"{name}-real"]["generated"]
        assert records[f"{name}-real"]["kv"]["kept_bytes"] > 0
    assert Condition(name="x", kv_policy=RazorKV(), real_cache=True).spec.endswith("|real")
    assert "|real" not in Condition(name="x", kv_policy=RazorKV()).spec  # earlier runs' specs are unchanged


def test_refusals_name_the_problem(models, tiny_folder):
    import transformers as T

    model = models["llama"]
    with pytest.raises(EditError, match="outside"):
        RazorKV(full=frozenset({(5, 0)})).cache(model)
    plain = hl.load(T.AutoModelForCausalLM.from_pretrained(tiny_folder("llama"), attn_implementation="sdpa"))
    plain.hf.config._attn_implementation = "sdpa"  # a model whose attention does not run headlab's seam
    with pytest.raises(EditError, match="loaded by headlab"):
        RazorKV().cache(plain)
    with pytest.raises(EditError, match="prefilled KV cache"):
        RazorCache.from_cache(model, RazorKV(), object())
    cache = RazorKV(sinks=1, window=2).cache(model)
    with torch.no_grad():
        model.forward_cached(_ids(9), cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
