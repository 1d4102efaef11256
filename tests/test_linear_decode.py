"""Recurrent decoding of headlab's linear-attention LMs (HeadlabLinearCache).

The cache must change nothing but the cost: greedy tokens equal the prefix rerun's (use_cache=False) token for token,
each decode step's logits equal the full forward's last position, for every kind, hybrid stacks, padded batches and
the committed twins; and a decode step still goes through headlab's seam (patterns with keep_keys, a clear error
without, edits). The same with short convolutions on q, k, v (`conv-<stack>`: the cache keeps each layer's last K − 1
convolution inputs).
"""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab.heads import HeadRef
from headlab.models.linear import (
    KINDS,
    HeadlabLinearCache,
    HeadlabLinearConfig,
    HeadlabLinearForCausalLM,
    PatternUnavailable,
)

torch.set_num_threads(1)

STACKS = {kind: [kind, kind] for kind in KINDS}
STACKS["hybrid"] = ["swa", "deltanet", "gla", "based"]
STACKS["based+swa"] = ["swa", "based"]  # the BASED twin's stack
STACKS["moh"] = ["swa", "softmax"]
# the same stacks with a short convolution (kernel 3) on every layer's q, k, v
STACKS.update({f"conv-{name}": kinds for name, kinds in list(STACKS.items()) if name != "moh"})
LINEAR = ("linear", "hedgehog", "based", "gla", "deltanet")
CONV = 3


def make(kinds, *, seed=0, max_positions=64, **kw):
    torch.manual_seed(seed)
    moh = {"moh_active_heads": 1, "moh_shared_heads": 1} if kw.pop("moh", False) else {}
    cfg = HeadlabLinearConfig(vocab_size=50, hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=2,
                              intermediate_size=48, layer_kinds=list(kinds), window=5, based_feature_dim=8,
                              max_position_embeddings=max_positions, **moh, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so patterns and tokens are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) or "router" in name:
                p.normal_(0, 0.4)
    return model


def stack_model(stack):
    return make(STACKS[stack], moh=stack == "moh", short_conv=CONV if stack.startswith("conv-") else 0)


def prompts(batch=3, length=11, seed=1):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(ids, lengths):
    """Each row's last `lengths[i]` tokens real, the rest padding on the left (as generate wants)."""
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n:] = 1
    return ids * mask, mask


def new_token_lengths(model):
    """Record the input length of every forward (to see that decode steps feed one token)."""
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("stack", list(STACKS))
def test_greedy_generation_with_the_cache_equals_the_prefix_rerun(stack):
    model = stack_model(stack)
    ids = prompts()
    seen = new_token_lengths(model)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert seen == [11] + [1] * 11, "prefill once, then one token per step"
        rerun = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert seen[12:] == list(range(11, 23)), "use_cache=False reruns the whole prefix"
    assert cached.shape == (3, 23) and torch.equal(cached, rerun)
    ids, mask = left_padded(ids, [11, 6, 3])  # different prompt lengths, padded on the left
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        rerun = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               use_cache=False)
    assert torch.equal(cached, rerun)


@pytest.mark.parametrize("stack", list(STACKS))
def test_each_decode_step_has_the_full_forwards_last_logits(stack):
    """Decode steps of 1 and of several tokens, from a right-padded prefill: logits as the full forward's."""
    model = stack_model(stack)
    ids = prompts(length=9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: the new tokens then follow the padded slots, as in the prefix rerun
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, seq, full_mask = out.cache, ids, mask
        assert isinstance(cache, HeadlabLinearCache) and cache.get_seq_length() == 9
        for step, n in enumerate([1, 1, 3, 1, 2, 1]):
            new = prompts(length=n, seed=10 + step)
            seq, full_mask = torch.cat([seq, new], 1), torch.cat([full_mask, torch.ones_like(new)], 1)
            out = model(new, attention_mask=full_mask, cache=cache)  # generate's [B, past + Q] mask
            ref = model(seq, attention_mask=full_mask).logits[:, -n:]
            assert out.cache is cache and cache.get_seq_length() == seq.shape[1]
            err = (out.logits - ref).abs().max().item()
            assert err < 1e-5 * max(1.0, ref.abs().max().item()), (stack, step, err)


def test_the_cache_holds_the_states_described():
    model = make(["softmax", "swa", "linear", "gla", "deltanet", "based"])
    with torch.no_grad():
        cache = model(prompts(batch=2, length=9), use_cache=True).cache
    soft, swa, lin, gla, delta, based = cache.layers
    assert soft.keys.shape == (2, 2, 9, 16) and soft.state is None
    assert swa.keys.shape == (2, 2, 4, 16)  # window 5: the last 4 keys are all a new token can still see
    S, z = lin.state
    assert S.shape == (2, 2, 16, 16) and z.shape == (2, 2, 16) and lin.keys is None and lin.fk is None
    assert gla.state.shape == (2, 2, 16, 16) and delta.state.shape == (2, 2, 16, 16)  # deltanet: [B, H, D, F]
    assert based.state[0].shape == (2, 2, 1 + 8 + 64, 16)  # the Taylor map's 1 + d + d² features
    # the state is the mixer's own (Σ φ(k) vᵀ of the prefill) and z its keys' sum
    with hl.load(model, device="cpu").capturing(layers=[2, 3, 4]) as cap, torch.no_grad():
        model(prompts(batch=2, length=9))
    for layer, entry in ((2, lin), (3, gla), (4, delta)):
        rec = cap.records[layer]
        state = rec.mixer.state(rec.v)
        mine = entry.state[0] if layer == 2 else entry.state.transpose(-1, -2) if layer == 4 else entry.state
        assert (mine - state).abs().max() < 1e-5
    assert (lin.state[1] - cap.records[2].mixer.fk.float().sum(2)).abs().max() < 1e-4


@pytest.mark.parametrize("name", [f"{task}-{kind}" for task in ("recall", "text")
                                  for kind in ("softmax", "linear", "hedgehog", "based", "gla", "deltanet")])
def test_committed_twins_generate_the_same_tokens_with_the_cache(name):
    model = hl.load(f"twin-{name}", device="cpu")
    if name.startswith("recall"):
        from headlab.models.linear.train import recall_eval_batch

        ids = recall_eval_batch(2, 16, seed=0)[0][:, :40]
        mask = torch.ones_like(ids)
    else:
        batch = model.encode(["In the beginning was the Word,", "And God said"])
        lengths = batch.attention_mask.sum(1).tolist()
        ids, mask = left_padded(_left(batch.input_ids, lengths), lengths)  # generate's padding side
    with torch.no_grad():
        cached = model.hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
        rerun = model.hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, use_cache=False)
        assert torch.equal(cached, rerun), name
        # and each step's logits are the full forward's last ones
        T = ids.shape[1]
        cache = model.hf(ids, attention_mask=mask, use_cache=True).cache
        full_mask = torch.cat([mask, torch.ones_like(cached[:, T:])], 1)
        for t in range(T, cached.shape[1]):
            step = model.hf(cached[:, t:t + 1], attention_mask=full_mask[:, :t + 1], cache=cache).logits[:, -1]
            ref = model.hf(cached[:, :t + 1], attention_mask=full_mask[:, :t + 1]).logits[:, -1]
            assert (step - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item()), (name, t)


def _left(ids, lengths):
    """Right-padded rows → the same real tokens at the right end."""
    out = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        out[i, ids.shape[1] - n:] = ids[i, :n]
    return out


@pytest.mark.parametrize("stack", ["hybrid", "based+swa", "softmax", "linear", "hedgehog", "conv-hybrid",
                                   "conv-based+swa", "conv-linear"])
def test_decode_patterns_through_the_seam_with_keep_keys(stack):
    """forward_cached with keep_keys: each layer's decode record has the full forward's last pattern row(s), and
    pattern @ v is the layer's output z there too."""
    model = hl.load(stack_model(stack), device="cpu")
    ids = prompts(batch=1, length=12)
    with torch.no_grad():
        full = model.run(ids, with_z=True)
        cache = HeadlabLinearCache(model.hf.config, keep_keys=True)
        _, cache = model.forward_cached(ids[:, :8], cache)
        _, cache = model.forward_cached(ids[:, 8:10], cache)  # a step of 2 tokens
        with model.capturing(with_z=True) as cap:
            logits, cache = model.forward_cached(ids[:, 10:], cache)
    assert (logits - full.logits[0, -1]).abs().max() < 1e-5
    for layer, rec in cap.records.items():
        kind = model.layer_kinds[layer]
        p = rec.pattern()
        ref = full.records[layer].pattern()[:, :, -2:]
        assert p.shape == (1, 2, 2, 12), (kind, p.shape)  # the new queries' rows over every key so far
        assert (p - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item()), kind
        out = torch.matmul(p, rec.v.float()).transpose(1, 2)
        assert (out - rec.z.float()).abs().max() < 1e-5 * max(1.0, rec.z.abs().max().item()), kind
        sub = rec.pattern(heads=[1], rows=slice(1, 2))
        assert torch.allclose(sub, p[:, 1:, 1:], atol=1e-6 * max(1.0, p.abs().max().item()))
        if kind in LINEAR:
            assert rec.mixer.past == 10 and rec.q.shape[2] == 2 and rec.k.shape[2] == 12


def test_without_keep_keys_a_linear_decode_pattern_is_refused_by_name():
    model = hl.load(make(["swa", "gla", "deltanet", "based"]), device="cpu")
    ids = prompts(batch=2, length=9)
    with torch.no_grad():
        _, cache = model.forward_cached(ids[:1, :-1])
        with model.capturing() as cap:
            model.forward_cached(ids[:1, -1:], cache)
    assert cap.records[0].pattern().shape == (1, 2, 1, 5)  # swa: over the window's keys (as HF's sliding caches)
    for layer in (1, 2, 3):
        rec = cap.records[layer]
        assert rec.q.shape[2] == rec.k.shape[2] == 1 and rec.mask.shape == (1, 1, 1, 9)
        with pytest.raises(PatternUnavailable, match="keep_keys=True"):
            rec.pattern()
        assert isinstance(rec.mixer.state(rec.v), torch.Tensor)  # the state is still there


def test_edits_apply_at_decode_steps_as_in_the_prefix_rerun():
    model = hl.load(make(["swa", "deltanet", "gla", "based"]), device="cpu")
    ids = prompts(batch=2, length=7)
    edits = [hl.Scale(HeadRef(1, 0), factor=0.0), hl.ablate(HeadRef(0, 1), how="uniform"),
             hl.ablate(HeadRef(2, 1), how="uniform")]
    for edit in edits:
        with hl.edit(model, edit), torch.no_grad():
            rerun = model.hf.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
            kept = model.hf.generate(ids, max_new_tokens=6, do_sample=False,
                                     cache=HeadlabLinearCache(model.hf.config, keep_keys=True))
            assert torch.equal(kept, rerun), edit
            if edit is edits[0]:  # an output-level edit needs no kept keys
                assert torch.equal(model.hf.generate(ids, max_new_tokens=6, do_sample=False), rerun)
    with torch.no_grad():
        plain = model.hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, rerun)  # the edits did something


@pytest.mark.parametrize("stack", ["hybrid", "conv-hybrid"])
def test_beam_search_reorders_the_cache(stack):
    model = stack_model(stack)
    ids = prompts(batch=2, length=7)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3)
        rerun = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(cached, rerun)


def test_the_cache_keeps_and_reorders_the_convolution_inputs():
    """Each layer keeps its last K − 1 (masked) q, k, v projection inputs, zeros before the first token; batch
    reshuffles move them with the rows."""
    model = stack_model("conv-hybrid")
    ids, mask = left_padded(prompts(length=6), [6, 1, 4])
    inputs = {}
    for i, block in enumerate(model.model.layers):
        block.attn.q_proj.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, out))
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
    for i, layer in enumerate(cache.layers):
        q = layer.conv[0]
        assert q.shape == (3, CONV - 1, model.config.num_attention_heads * model.model.layers[i].attn.qk_dim)
        assert torch.equal(q[0], inputs[i][0, -2:]) and torch.equal(q[2], inputs[i][2, -2:])
        assert torch.equal(q[1, 0], torch.zeros_like(q[1, 0])) and torch.equal(q[1, 1], inputs[i][1, -1])  # padding
        assert [t.shape[2] for t in layer.conv] == [q.shape[2], q.shape[2], 2 * 16]
    before = [tuple(t.clone() for t in layer.conv) for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for old, layer in zip(before, cache.layers):
        assert all(torch.equal(new, o[[2, 0, 0]]) for new, o in zip(layer.conv, old))
    cache.reset()
    assert all(layer.conv is None for layer in cache.layers)


def test_positions_past_the_learned_ones_are_refused_clearly():
    model = make(["swa", "gla"], max_positions=12)
    with torch.no_grad():
        out = model(prompts(batch=1, length=10), use_cache=True)
        out = model(prompts(batch=1, length=2), cache=out.cache)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(prompts(batch=1, length=1), cache=out.cache)
        assert out.cache.get_seq_length() == 12  # the refused step left the cache as it was
        with pytest.raises(ValueError, match="learned positions"):
            model.generate(prompts(batch=1, length=10), max_new_tokens=5, do_sample=False)


def test_bad_caches_and_masks_have_clear_errors():
    model = make(["linear", "softmax"])
    from transformers import DynamicCache

    with torch.no_grad(), pytest.raises(TypeError, match="HeadlabLinearCache"):
        model(prompts(), cache=DynamicCache())
    with torch.no_grad():
        cache = model(prompts(length=5), use_cache=True).cache
        with pytest.raises(ValueError, match="attention_mask covers 4 tokens"):
            model(prompts(length=1), attention_mask=torch.ones(3, 4), cache=cache)
        assert model(prompts(length=5), use_cache=False).cache is None
        plain = model(prompts(length=5))
        assert plain.cache is None
        assert torch.equal(model(prompts(length=5), cache=cache, use_cache=False).logits, plain.logits)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


@pytest.mark.parametrize("position", ["none", "rotary"])
def test_decoding_follows_the_other_position_schemes(position):
    """Without learned positions nothing limits the length; RoPE rotates the new keys at their own positions."""
    model = make(["swa", "gla", "softmax", "based"], position=position, max_positions=None)
    ids, mask = left_padded(prompts(length=9), [9, 5, 7])
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        rerun = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               use_cache=False)
    assert torch.equal(cached, rerun)
