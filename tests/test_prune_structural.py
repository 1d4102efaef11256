"""Structural pruning: the smaller model computes what the masked (zero-ablated) model computes, and loads back."""

from __future__ import annotations


import pytest
import torch
import transformers as T

import headlab as hl
from headlab.errors import HeadlabError
from headlab.prune import (
    compare,
    equality,
    is_pruned_folder,
    kv_bytes_per_token,
    load_pruned,
    measured_kv_bytes,
    param_count,
    pruned_layouts,
    remove_heads,
    save_pruned,
)
from headlab.prune.structural import plan_layout

# layer 0: every head (an empty layer); layer 1: KV group 0 entirely; layer 2: uneven groups (3 and 1
# heads kept); layer 3: nothing
REMOVED = ([hl.HeadRef(0, h) for h in range(8)] + [hl.HeadRef(1, h) for h in (0, 1, 2, 3, 5)]
           + [hl.HeadRef(2, h) for h in (0, 4, 5, 6)])


def tiny_gqa_llama(backend: str = "sdpa") -> hl.HeadModel:
    """4 layers × 8 query heads in 2 KV groups, head dim 16, with q/k/v/o biases."""
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=128,
                        bos_token_id=1, attention_bias=True)
    cfg._attn_implementation = backend
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that a dropped bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return hl.load(model)


def tiny_gpt2() -> hl.HeadModel:
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=0,
                       eos_token_id=0)
    return hl.load(T.GPT2LMHeadModel(cfg).eval())


PROMPTS = [list(range(3, 40)), list(range(50, 70)), [5, 9, 2, 7] * 6]  # ragged: right padding is exercised


def masked_logits(model: hl.HeadModel, heads) -> torch.Tensor:
    with hl.edit(model, hl.ablate(heads)):
        return model.forward(PROMPTS).logits


def test_plan_layout_gqa():
    assert plan_layout(8, 2, range(8)).heads == () and plan_layout(8, 2, range(8)).ratio is None
    lay = plan_layout(8, 2, [0, 1, 2, 3, 5])
    assert lay.heads == (4, 6, 7) and lay.kv == (1,) and lay.kv_slot == (0, 0, 0) and lay.ratio == 3
    lay = plan_layout(8, 2, [0, 4, 5, 6])
    assert lay.heads == (1, 2, 3, 7) and lay.kv == (0, 1) and lay.kv_slot == (0, 0, 0, 1) and lay.ratio is None
    assert plan_layout(8, 2, [0, 4]).ratio == 3
    lay = plan_layout(4, 4, [2])
    assert lay.heads == (0, 1, 3) == lay.kv and lay.ratio == 1


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_llama_gqa_matches_masked_and_loads_back(backend, tmp_path):
    model = tiny_gqa_llama(backend)
    before = model.forward(PROMPTS).logits
    ref = masked_logits(model, REMOVED)
    pruned = remove_heads(model, REMOVED)
    assert torch.equal(model.forward(PROMPTS).logits, before)  # the original is untouched
    assert (pruned.forward(PROMPTS).logits - ref).abs().max() < 1e-5
    lays = pruned_layouts(pruned)
    assert [len(lay.heads) for lay in lays] == [0, 3, 4, 8] and [len(lay.kv) for lay in lays] == [0, 1, 2, 2]

    save_pruned(pruned, tmp_path / "p")
    assert is_pruned_folder(tmp_path / "p") and not is_pruned_folder(tmp_path)
    loaded = load_pruned(tmp_path / "p", attn_implementation=backend)
    assert loaded.backend == backend
    assert (loaded.forward(PROMPTS).logits - ref).abs().max() < 1e-5
    attn = loaded.attention_module(1)
    assert attn.q_proj.weight.shape == (3 * 16, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 3 * 16) and attn.num_key_value_groups == 3
    uneven = loaded.attention_module(2)  # 3 + 1 heads: k/v widened per query head by the layer's own function
    assert uneven.q_proj.weight.shape == (4 * 16, 64) and uneven.k_proj.weight.shape == (2 * 16, 64)
    assert uneven.config._attn_implementation == "headlab_gqa" and loaded.hf.config._attn_implementation == "headlab"
    run = loaded.run(PROMPTS, layers=[2])  # captures see one key/value head per query head
    assert run.records[2].k.shape[1] == 4 and run.patterns(2).shape[1] == 4


def test_llama_costs_and_kv_cache(tmp_path):
    model = tiny_gqa_llama()
    pruned = remove_heads(model, REMOVED)
    # KV groups kept: 0 + 1 + 2 + 2 of 4 × 2; the cache really holds that much
    assert kv_bytes_per_token(pruned) / kv_bytes_per_token(model) == pytest.approx(5 / 8)
    assert measured_kv_bytes(pruned, 10) == 10 * kv_bytes_per_token(pruned)
    assert measured_kv_bytes(model, 10) == 10 * kv_bytes_per_token(model)
    c = compare(model, pruned)
    d, hd = 64, 16
    # q/o: 3 + 4 + 8 of 32 heads; k/v: 5 of 8 groups; the o_proj bias stays in every layer
    attn = lambda heads, kv: 2 * heads * hd * d + heads * hd + 2 * kv * hd * (d + 1) + d  # noqa: E731
    assert param_count(pruned, attention_only=True) == sum(attn(h, g) for h, g in [(0, 0), (3, 1), (4, 2), (8, 2)])
    assert c["params_ratio"] < 1 and c["attn_params_ratio"] == pytest.approx(
        param_count(pruned, attention_only=True) / param_count(model, attention_only=True))


def test_generation_with_cache_matches_masked():
    model = tiny_gqa_llama()
    pruned = remove_heads(model, REMOVED)  # layer 0 is empty: its cache entries are [B, 0, T, D]
    ids = torch.tensor([PROMPTS[0]])
    with hl.edit(model, hl.ablate(REMOVED)):
        want = model.hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(pruned.hf.generate(ids, max_new_tokens=8, do_sample=False), want)


def test_gpt2_matches_masked_and_loads_back(tmp_path):
    model = tiny_gpt2()
    heads = [hl.HeadRef(0, h) for h in range(4)] + [hl.HeadRef(1, 2)]
    ref = masked_logits(model, heads)
    pruned = remove_heads(model, heads)
    assert (pruned.forward(PROMPTS).logits - ref).abs().max() < 1e-5
    loaded = load_pruned(save_pruned(pruned, tmp_path / "g"))
    assert (loaded.forward(PROMPTS).logits - ref).abs().max() < 1e-5
    assert loaded.attention_module(1).c_attn.weight.shape == (64, 3 * 3 * 16)
    assert kv_bytes_per_token(loaded) / kv_bytes_per_token(model) == pytest.approx(7 / 12)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_like_families(family, tiny_folder, tmp_path):
    model = hl.load(tiny_folder(family), device="cpu")  # 2 layers × 4 heads; mistral 2 KV groups, qwen2 1
    heads = [hl.HeadRef(0, 0), hl.HeadRef(0, 1), hl.HeadRef(0, 2), hl.HeadRef(1, 3)]
    ref = masked_logits(model, heads)
    loaded = load_pruned(save_pruned(remove_heads(model, heads), tmp_path / family))
    assert (loaded.forward(PROMPTS).logits - ref).abs().max() < 1e-5


def test_nothing_removed_is_the_same_model():
    model = tiny_gqa_llama()
    pruned = remove_heads(model, [])
    assert (pruned.forward(PROMPTS).logits - model.forward(PROMPTS).logits).abs().max() < 1e-6
    assert param_count(pruned) == param_count(model)


def test_errors(tmp_path):
    model = tiny_gqa_llama()
    with pytest.raises(HeadlabError, match="not structurally pruned"):
        save_pruned(model, tmp_path / "x")
    with pytest.raises(HeadlabError, match="already structurally pruned"):
        remove_heads(remove_heads(model, REMOVED[:1]), REMOVED[1:2])
    with pytest.raises(hl.HeadIndexError):
        remove_heads(model, [hl.HeadRef(0, 8)])
    model.hf.save_pretrained(tmp_path / "plain")
    with pytest.raises(HeadlabError, match="not a structurally pruned"):
        load_pruned(tmp_path / "plain")


def test_hl_load_reads_a_pruned_folder(tmp_path):
    model = tiny_gqa_llama()
    ref = masked_logits(model, REMOVED)
    folder = save_pruned(remove_heads(model, REMOVED), tmp_path / "p")
    loaded = hl.load(folder)
    assert pruned_layouts(loaded) is not None
    assert (loaded.forward(PROMPTS).logits - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_smollm2_quarter_pruned_matches_masked(tmp_path):
    """SmolLM2 (4-bit dequantised instruct weights) without a random 25% of its heads, saved and reloaded."""
    from headlab.prune import RankParams, TextEval, n_to_remove, prune_order, rank
    from headlab.prune.evals import HELDOUT_TEXT

    torch.set_num_threads(1)
    model = hl.load("smollm2-135m", device="cpu")
    heads = prune_order(rank(model, "random", RankParams(seed=0)).scores)[:n_to_remove(0.25, 270)]
    text = TextEval(path=str(HELDOUT_TEXT), ctx=64, windows=2).tokens(model)
    loaded = load_pruned(save_pruned(remove_heads(model, heads), tmp_path / "s"))
    check = equality(model, loaded, heads, text)
    assert check["max_abs_diff_float64"] < 1e-5  # the same function
    # float32: matmuls of other shapes round differently; below the masked model's own float32 error
    assert check["max_abs_diff"] <= 2 * check["rounding_of_masked"]
    c = compare(model, loaded)
    assert c["params_ratio"] < 0.97 and c["kv_ratio"] <= 1 and len(heads) == 68
