"""Patterns computed by headlab from q and k equal HF eager `output_attentions`."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from conftest import FAMILIES, VOCAB


def _eager(folder):
    config = T.AutoConfig.from_pretrained(folder)
    cls = getattr(T, config.architectures[0])
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_patterns_match_hf_eager_on_padded_batch(family, tiny_folder):
    folder = tiny_folder(family)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 23))
    lengths = [23, 17, 9]
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        ref = _eager(folder)(input_ids=ids, attention_mask=mask, output_attentions=True)

    model = hl.load(folder, device="cpu")
    run = model.run([ids[i, :n].tolist() for i, n in enumerate(lengths)])
    assert torch.equal(run.batch.attention_mask.cpu(), mask)
    for layer in range(model.n_layers):
        ours = run.patterns(layer)
        assert ours.shape == (3, model.n_heads, 23, 23)
        for i, n in enumerate(lengths):
            err = (ours[i, :, :n, :n] - ref.attentions[layer][i, :, :n, :n]).abs().max().item()
            assert err < 1e-5, f"{family} layer {layer} item {i}: {err}"
            assert ours[i, :, :n, n:].abs().sum().item() == 0.0  # no weight on padding keys
    # a single head through the public per-head call
    head = hl.HeadRef(1, 3)
    assert torch.allclose(run.pattern(head)[0], ref.attentions[1][0, 3], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_outputs_unchanged_by_the_seam(family, tiny_folder):
    """Wrapping a model does not change its outputs: sdpa under the seam equals plain sdpa."""
    folder = tiny_folder(family)
    plain = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    model = hl.load(folder, device="cpu")
    ids = torch.randint(3, VOCAB, (2, 19))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model.hf(ids).logits)


def test_gqa_heads_share_keys(tiny_folder):
    model = hl.load(tiny_folder("llama"), device="cpu")
    assert (model.n_heads, model.n_kv_heads) == (4, 2)
    run = model.run(list(range(5, 20)))
    assert torch.equal(run.k(hl.HeadRef(0, 0)), run.k(hl.HeadRef(0, 1)))
    assert not torch.equal(run.k(hl.HeadRef(0, 1)), run.k(hl.HeadRef(0, 2)))
    assert run.q(hl.HeadRef(1, 2)).shape == (1, 15, model.head_dim)


def test_pattern_rows_sum_to_one_and_respect_causality(tiny_folder):
    model = hl.load(tiny_folder("gpt2"), device="cpu")
    run = model.run(list(range(3, 40)), layers=[0])
    p = run.patterns(0)[0]
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-6)
    assert p.triu(1).abs().max().item() == 0.0


def test_bf16_patterns_close_to_fp32(tiny_folder):
    folder = tiny_folder("llama")
    ids = list(range(5, 30))
    p32 = hl.load(folder, device="cpu").run(ids).patterns(1)
    p16 = hl.load(folder, device="cpu", dtype="bfloat16").run(ids).patterns(1)
    assert (p32 - p16).abs().max().item() < 0.05
