"""Recurrent decoding of linearized Llama-family models (LinearizedCache).

The cache must change nothing but the cost: greedy tokens equal the ordinary KV cache's (DynamicCache: each new row
recomputed over the cached keys) and the prefix rerun's (use_cache=False), token for token, for all-linear and hybrid
layers, batch 1 and 2, padded batches and beams; each decode step's logits equal the full forward's last positions;
the state is Σ φ(k) vᵀ; a decode step still goes through headlab's seam (patterns where the cache holds the keys, a
clear error where it does not, edits as in the rerun); generate and HeadModel.forward_cached use it by default.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from transformers import DynamicCache

import headlab as hl
from headlab.analyses.retrieval import greedy_decode
from headlab.heads import HeadRef
from headlab.models.linear import PatternUnavailable
from headlab.models.linearized import HeadlabLinearizedForCausalLM, from_base
from headlab.models.linearized_cache import LinearizedCache

torch.set_num_threads(1)

V = 40
# per layer, the heads kept softmax (4 query heads in 2 KV groups)
LAYOUTS = {
    "linear": [[], [], []],
    "hybrid": [[1], [0, 3], []],
    "softmax-layer": [[0, 1, 2, 3], [2], []],  # a layer whose heads are all softmax (plain Llama attention)
}


def make(layout: str = "hybrid", *, seed: int = 0) -> HeadlabLinearizedForCausalLM:
    """A tiny random Llama (3 layers, 4 heads in 2 KV groups, head dim 16) linearized with random feature maps."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, bos_token_id=0,
                        eos_token_id=None, pad_token_id=0)
    base = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger q/k than the init, so patterns and tokens are far from uniform
        for name, p in base.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
    model = from_base(base, feature_dim=8, softmax_heads=LAYOUTS[layout])
    with torch.no_grad():  # trained-looking (not identity) feature maps
        for layer in model.model.layers:
            layer.self_attn.feature_map.normal_(0, 0.5)
            layer.self_attn.feature_bias.normal_(0, 0.2)
    return model.eval()


def prompts(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last `lengths[i]` tokens real, the rest padding on the left (as generate wants)."""
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n:] = 1
    return ids * mask, mask


def watch(model):
    """Record (input length, cache type) of every forward."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((ids.shape[1], type(cache).__name__))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_the_kv_cache_and_the_prefix_rerun(layout, batch):
    model = make(layout)
    ids = prompts(batch)
    seen, handle = watch(model)
    with torch.no_grad():
        recurrent = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert seen == [(10, "LinearizedCache")] + [(1, "LinearizedCache")] * 9, "prefill once, then one token a step"
        seen.clear()
        kv = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="dynamic")
        assert {c for _, c in seen} == {"DynamicCache"}, "the ordinary KV cache stays reachable"
        kv2 = model.generate(ids, max_new_tokens=10, do_sample=False, cache=DynamicCache(config=model.config))
        seen.clear()
        rerun = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
        assert [n for n, _ in seen] == list(range(10, 20)), "use_cache=False reruns the whole prefix"
    handle.remove()
    assert recurrent.shape == (batch, 20)
    assert torch.equal(recurrent, kv) and torch.equal(recurrent, kv2) and torch.equal(recurrent, rerun)


@pytest.mark.parametrize("layout", ["linear", "hybrid"])
def test_left_padded_batches_and_beams_decode_as_the_rerun(layout):
    model = make(layout)
    ids, mask = left_padded(prompts(3, 9), [9, 5, 2])
    with torch.no_grad():
        recurrent = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        kv = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            cache_implementation="dynamic")
        rerun = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(recurrent, kv) and torch.equal(recurrent, rerun)
        beams = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False, num_beams=3)
        beams_rerun = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=6, do_sample=False,
                                     num_beams=3, use_cache=False)
    assert torch.equal(beams, beams_rerun)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_decode_step_has_the_full_forwards_last_logits(layout):
    """Steps of 1 and of several tokens, after a right-padded prefill: logits as the full forward's (float32)."""
    model = make(layout)
    ids = prompts(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: the new tokens follow the padded slots, as in the full forward
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, seq, full_mask = out.cache, ids, mask
        assert isinstance(cache, LinearizedCache) and cache.get_seq_length() == 9
        for step, n in enumerate([1, 1, 3, 1, 2]):
            new = prompts(2, n, seed=10 + step)
            seq, full_mask = torch.cat([seq, new], 1), torch.cat([full_mask, torch.ones_like(new)], 1)
            out = model(new, attention_mask=full_mask, cache=cache)  # generate's [B, past + Q] mask
            ref = model(seq, attention_mask=full_mask).logits[:, -n:]
            assert out.cache is cache and cache.get_seq_length() == seq.shape[1]
            err = (out.logits - ref).abs().max().item()
            assert err < 1e-4 * max(1.0, ref.abs().max().item()), (layout, step, err)


def test_forward_cached_decodes_recurrently_by_default():
    model = hl.load(make("hybrid"), device="cpu")
    ids = prompts(1, 16)
    with torch.no_grad():
        full = model.hf(ids).logits[0]
        logits, cache = model.forward_cached(ids[:, :10])
        assert isinstance(cache, LinearizedCache) and cache.get_seq_length() == 10
        assert (logits - full[9]).abs().max() < 1e-4
        for t in range(10, 16):
            logits, cache = model.forward_cached(ids[:, t:t + 1], cache)
            assert (logits - full[t]).abs().max() < 1e-4, t
        # retrieval's greedy decoding: recurrent == KV cache == rerun, and a copied cache decodes alike
        _, rec = model.forward_cached(ids[:, :9])
        _, kv = model.forward_cached(ids[:, :9], DynamicCache(config=model.hf.config))
        assert isinstance(kv, DynamicCache)
        a = greedy_decode(model, copy.deepcopy(rec), int(ids[0, 9]), max_new_tokens=12, stop=set())
        b = greedy_decode(model, rec, int(ids[0, 9]), max_new_tokens=12, stop=set())
        c = greedy_decode(model, kv, int(ids[0, 9]), max_new_tokens=12, stop=set())
        rerun = model.hf.generate(ids[:, :10], max_new_tokens=12, do_sample=False, use_cache=False)[0, 10:]
    assert a == b == c == rerun.tolist()


def test_the_cache_holds_the_hedgehog_state_and_no_keys_for_linear_layers():
    model = make("hybrid")
    ids = prompts(2, 11)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    l0, l1, l2 = cache.layers
    S, z = l0.state
    assert S.shape == (2, 3, 16, 16) and z.shape == (2, 3, 16)  # 3 linear heads, 2F = 16 features, D = 16
    assert l1.state[0].shape == (2, 2, 16, 16)
    assert l0.keys.shape == (2, 2, 11, 16) and l1.keys.shape == (2, 2, 11, 16)  # hybrids: K/V of every group
    assert l2.keys is None and l2.values is None  # all linear: the state only
    # the state is Σ_j φ(k_j) v_jᵀ of the full forward's mixer (and z = Σ_j φ(k_j))
    lm = hl.load(model, device="cpu")
    with lm.capturing() as cap, torch.no_grad():
        model(ids)
    for layer, entry in enumerate(cache.layers):
        rec = cap.records[layer]
        lin = rec.mixer.linear_heads
        ref = rec.mixer.state(rec.v)[:, lin]
        assert (entry.state[0] - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
        assert (entry.state[1] - rec.mixer.fk[:, lin].float().sum(2)).abs().max() < 1e-4
    # decoding more tokens does not grow an all-linear layer's entry
    with torch.no_grad():
        for t in range(5):
            model(prompts(2, 1, seed=20 + t), cache=cache)
    assert l2.state[0].shape == (2, 4, 16, 16) and l2.keys is None and cache.get_seq_length() == 16


@pytest.mark.parametrize("keep_keys", [False, True])
def test_decode_patterns_through_the_seam(keep_keys):
    """Each layer's decode record: the full forward's last pattern rows wherever the cache holds the keys (hybrid
    layers always, all-linear ones with keep_keys), pattern @ v = z there; PatternUnavailable, by name, elsewhere."""
    model = hl.load(make("hybrid"), device="cpu")
    ids = prompts(1, 12)
    with torch.no_grad():
        full = model.run(ids, with_z=True)
        cache = LinearizedCache(model.hf.config, keep_keys=keep_keys)
        _, cache = model.forward_cached(ids[:, :8], cache)
        _, cache = model.forward_cached(ids[:, 8:10], cache)  # a step of 2 tokens
        with model.capturing(with_z=True) as cap:
            logits, cache = model.forward_cached(ids[:, 10:], cache)
    assert (logits - full.logits[0, -1]).abs().max() < 1e-4
    for layer, rec in cap.records.items():
        assert rec.mixer.past == 10 and rec.q.shape[2] == 2
        if layer == 2 and not keep_keys:  # all linear: only the state
            assert rec.k.shape[2] == rec.v.shape[2] == 2 and rec.mask.shape == (1, 1, 2, 12)
            with pytest.raises(PatternUnavailable, match="keep_keys=True"):
                rec.pattern()
            assert rec.mixer.state(rec.v).shape == (1, 4, 16, 16)  # the state is still there
            continue
        assert rec.k.shape[2] == 12
        p = rec.pattern()
        ref = full.records[layer].pattern()[:, :, -2:]
        assert p.shape == (1, 4, 2, 12)
        assert (p - ref).abs().max() < 1e-5, layer
        out = torch.matmul(p, rec.v.float().repeat_interleave(2, 1)).transpose(1, 2)
        assert (out - rec.z.float()).abs().max() < 1e-4 * max(1.0, rec.z.abs().max().item()), layer
        sub = rec.pattern(heads=[1], rows=slice(1, 2))
        assert torch.allclose(sub, p[:, 1:2, 1:], atol=1e-6)


def test_edits_apply_at_decode_steps_as_in_the_prefix_rerun():
    model = hl.load(make("hybrid"), device="cpu")
    ids = prompts(2, 7)
    ref = prompts(2, 9, seed=5)
    output_edits = [hl.Scale(HeadRef(2, 0), factor=0.0), hl.Scale(HeadRef(1, 1), factor=2.5),
                    hl.Ablate(HeadRef(2, 3), how="mean", reference=ref), hl.Ablate(HeadRef(0, 1), how="zero")]
    with torch.no_grad():
        plain = model.hf.generate(ids, max_new_tokens=6, do_sample=False)
        for edit in output_edits:  # output-level edits need no kept keys
            with hl.edit(model, edit):
                rerun = model.hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
                assert torch.equal(model.hf.generate(ids, max_new_tokens=6, do_sample=False), rerun), edit
        # attention-level: uniform ablation of a hybrid layer's linear head (its keys are cached anyway), and of an
        # all-linear layer's head with keep_keys
        for edit, keep in ((hl.Ablate(HeadRef(0, 0), how="uniform"), False),
                           (hl.Ablate(HeadRef(2, 1), how="uniform"), True)):
            with hl.edit(model, edit):
                rerun = model.hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
                cache = LinearizedCache(model.hf.config, keep_keys=keep)
                assert torch.equal(model.hf.generate(ids, max_new_tokens=6, do_sample=False, cache=cache), rerun)
            assert not torch.equal(rerun, plain)  # the edit did something
        # without keep_keys an all-linear layer's decode record has the new keys only: uniform ablation fails
        # instead of averaging over them
        with hl.edit(model, hl.Ablate(HeadRef(2, 1), how="uniform")), pytest.raises(RuntimeError):
            model.hf.generate(ids, max_new_tokens=3, do_sample=False)


def test_bad_uses_of_the_cache_are_refused_clearly():
    model = make("hybrid")
    with torch.no_grad():
        cache = model(prompts(1, 6), use_cache=True).cache
        model.set_softmax_heads([[1], [0], []])  # changed since the cache was filled
        with pytest.raises(RuntimeError, match="softmax heads"):
            model(prompts(1, 1), cache=cache)
        model.set_softmax_heads(LAYOUTS["hybrid"])
        small = LinearizedCache(T.LlamaConfig(num_hidden_layers=2))
        with pytest.raises(ValueError, match="layers"):
            model(prompts(1, 4), cache=small)
        cache = model(prompts(1, 6), use_cache=True).cache
        cache.layers[1].length = 3  # as after a forward that stopped inside a layer
        with pytest.raises(RuntimeError, match="stopped midway"):
            model(prompts(1, 1), cache=cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    with torch.no_grad():  # a plain forward (use_cache unset) keeps no recurrent state
        assert not isinstance(model(prompts(1, 4)).cache, LinearizedCache)
