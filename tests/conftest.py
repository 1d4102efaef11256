"""Shared fixtures: tiny random HF models of each supported family, saved to a folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (torch does not import triton)

# The Triton kernel tests run on the CPU through Triton's interpreter, which must be chosen before triton is
# first imported; on a CUDA machine the kernels run for real. (`make test` used to be the only place this was
# set, so `python -m pytest` failed them.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers as T  # noqa: E402

torch.set_num_threads(1)

VOCAB = 101


def tiny_config(family: str):
    """A 2-layer, 4-head random config of a family (Llama-like ones with GQA)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
    if family == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(num_key_value_heads=2, bos_token_id=1, **common)
    if family == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(num_key_value_heads=1, **common)
    if family == "bert":
        return T.BertModel, T.BertConfig(**common)
    if family == "roberta":
        return T.RobertaModel, T.RobertaConfig(pad_token_id=1, **{**common, "max_position_embeddings": 70})
    raise KeyError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "bert", "roberta"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A function family -> folder with a saved tiny random model of that family."""
    made: dict[str, object] = {}

    def make(family: str):
        if family not in made:
            cls, cfg = tiny_config(family)
            torch.manual_seed(0)
            model = cls(cfg).eval()
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make
