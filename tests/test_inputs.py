"""Loading and bad input: every mistake gets a headlab error that names it."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from conftest import VOCAB


@pytest.fixture(scope="module")
def gpt2(tiny_folder):
    return hl.load(tiny_folder("gpt2"), device="cpu")


def test_repr_and_geometry(tiny_folder):
    model = hl.load(tiny_folder("llama"), device="cpu")
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.head_dim) == (2, 4, 2, 16)
    assert model.causal and "2 KV groups" in repr(model) and "cpu/float32" in repr(model)
    bert = hl.load(tiny_folder("bert"), device="cpu")
    assert not bert.causal and "bidirectional" in repr(bert)
    assert len(model.heads()) == 8 and model.heads(layers=[1])[0] == hl.HeadRef(1, 0)


def test_wraps_an_hf_object(tiny_folder):
    hf = T.GPT2LMHeadModel.from_pretrained(tiny_folder("gpt2"))
    model = hl.load(hf, device="cpu")
    assert model.hf is hf and model.run([5, 6, 7]).patterns(0).shape == (1, 4, 3, 3)


def test_unknown_model_names_the_choices():
    with pytest.raises(hl.ModelNotFoundError, match="smollm2-135m"):
        hl.load("no-such-model")


def test_folder_without_safetensors_is_refused(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder("gpt2") / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(hl.ModelNotFoundError, match="never unpickles"):
        hl.load(tmp_path)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    cfg = T.GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
    with pytest.raises(hl.UnsupportedModelError, match="gpt2.*llama|supported families"):
        hl.load(T.GPTNeoXForCausalLM(cfg))
    with pytest.raises(hl.UnsupportedModelError, match="cannot wrap"):
        hl.load(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("prompt, match", [
    ("", "no tokenizer"),
    ([], "empty prompt"),
    ([[1, 2], []], "empty"),
    (torch.zeros(1, 0, dtype=torch.long), "empty prompt"),
    (torch.rand(1, 4), "integers"),
    ([1, VOCAB + 5], r"0\.\.100"),
    (list(range(1, 70)), "longer than .* context of 64"),
], ids=["text-without-tokenizer", "empty-list", "empty-row", "empty-tensor", "float-ids", "id-out-of-vocab",
        "too-long"])
def test_bad_prompts(gpt2, prompt, match):
    with pytest.raises(hl.PromptError, match=match):
        gpt2.run(prompt)


def test_empty_text_prompt_with_a_tokenizer():
    from headlab.models.head_model import HeadModel

    class Tok:
        bos_token_id = None

        def __call__(self, texts, **_):
            return {"input_ids": [[3] * len(t) for t in texts]}

    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    model = HeadModel(T.GPT2LMHeadModel(cfg), Tok())
    with pytest.raises(hl.PromptError, match="empty prompt"):
        model.run("")
    assert model.run("abc").batch.input_ids.shape == (1, 3)


def test_heads_out_of_range_are_named(gpt2):
    with pytest.raises(hl.HeadIndexError, match="layers 0..1"):
        gpt2.run([1, 2, 3], heads=[hl.HeadRef(2, 0)])
    with pytest.raises(hl.HeadIndexError, match="heads 0..3"):
        gpt2.run([1, 2, 3]).pattern(hl.HeadRef(0, 7))
    with pytest.raises(hl.HeadIndexError, match="non-negative"):
        hl.HeadRef(-1, 0)
    with pytest.raises(KeyError, match="not captured"):
        gpt2.run([1, 2, 3], layers=[0]).pattern(hl.HeadRef(1, 0))


def test_headref_parsing():
    assert hl.HeadRef.parse("L18H6") == hl.HeadRef(18, 6)
    assert hl.as_heads(["L1H2", (0, 3), hl.HeadRef(0, 1)]) == [hl.HeadRef(0, 1), hl.HeadRef(0, 3), hl.HeadRef(1, 2)]
    with pytest.raises(hl.HeadIndexError, match="L<layer>H<head>"):
        hl.HeadRef.parse("layer 3")


def test_encoder_has_no_loss(tiny_folder):
    bert = hl.load(tiny_folder("bert"), device="cpu")
    with pytest.raises(hl.PromptError, match="no language-model head"):
        bert.loss([5, 6, 7])


def test_losses_ignore_padding(gpt2):
    a, b = list(range(5, 17)), list(range(20, 27))
    both = gpt2.token_losses([a, b])
    assert torch.allclose(both[1, :6], gpt2.token_losses(b)[0], atol=1e-5)
    assert torch.isnan(both[1, 6:]).all()
    assert torch.allclose(gpt2.loss([a, b]), both.nanmean())
