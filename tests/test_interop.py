"""Interop: headlab against TransformerLens 4 (TransformerBridge) and nnsight on tiny random models.

* Patterns: `hl.load(folder).run(ids).patterns(l)` equals the bridge's `blocks.{l}.attn.hook_pattern`
  and HF eager's `output_attentions`, for GPT-2, Llama with grouped-query attention and BERT.
* `hl.load(bridge)` captures every layer with the same patterns and its edits take effect, while the
  bridge itself (hook_pattern, logits) is left as it was.
* `hl.load(nnsight_model)` (from a module, or from a path: not yet dispatched) gives the same patterns,
  and zero-ablating a head equals an nnsight trace that zeroes the head's slice of the output-projection
  input.

Every model is built offline from a random config (std 0.3, so patterns are far from uniform and a
parity check is not vacuous) and saved with a word-level tokenizer to a tmp folder. The measured max
abs errors are printed at the end of the module's tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import headlab as hl

VOCAB = 64
SEQ = 9
ATOL = 1e-5
FAMILIES = ["gpt2", "llama-gqa", "bert"]
CAUSAL_LMS = ["gpt2", "llama-gqa"]
ERRORS: dict[str, dict[str, float]] = {}  # family -> check -> max abs error, printed at the end


def _record(family: str, check: str, err: float) -> None:
    old = ERRORS.setdefault(family, {}).get(check, 0.0)
    ERRORS[family][check] = max(old, float(err))


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    lines = ["", "headlab interop: max abs errors (float32)"]
    for family, checks in ERRORS.items():
        lines += [f"  {family:10s} {check:50s} {err:.3e}" for check, err in sorted(checks.items())]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n".join(lines))


def _config(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, initializer_range=0.3)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, **common)
    if family == "llama-gqa":
        return transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        hidden_size=64, intermediate_size=128, max_position_embeddings=32,
                                        bos_token_id=2, eos_token_id=3, pad_token_id=1, **common)
    return transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                                   max_position_embeddings=32, pad_token_id=1, **common)


_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama-gqa": "LlamaForCausalLM", "bert": "BertForMaskedLM"}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `[UNK] [PAD] [BOS] [EOS] w4 … w63`, split on whitespace."""
    import tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="[BOS]", eos_token="[EOS]")


@dataclass
class Tiny:
    family: str
    folder: Path
    cls: type
    ids: torch.Tensor  # [2, SEQ], no padding

    def hf(self, **kwargs) -> transformers.PreTrainedModel:
        """A fresh, unwrapped copy of the model from its folder."""
        return self.cls.from_pretrained(self.folder, dtype=torch.float32, **kwargs).eval()

    def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        # Loaded from the folder: TransformerLens needs `name_or_path` in the tokenizer's init kwargs,
        # which a tokenizer built in memory lacks (KeyError in get_tokenizer_with_bos).
        return transformers.AutoTokenizer.from_pretrained(self.folder)


_BUILT: dict[str, Tiny] = {}


def _build(family: str, tmp_path_factory) -> Tiny:
    """Build (once per session) the tiny random model of a family and save it with a tokenizer."""
    if family not in _BUILT:
        torch.manual_seed(0)
        cls = getattr(transformers, _CLASSES[family])
        model = cls(_config(family)).eval()
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        ids = torch.randint(4, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
        _BUILT[family] = Tiny(family, folder, cls, ids)
    return _BUILT[family]


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILIES)
def tiny(request, tmp_path_factory) -> Tiny:
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=CAUSAL_LMS, ids=CAUSAL_LMS)
def causal_lm(request, tmp_path_factory) -> Tiny:
    """GPT-2 and Llama with GQA: the families the nnsight checks run on."""
    return _build(request.param, tmp_path_factory)


def _boot_bridge(tiny: Tiny):
    model_bridge = pytest.importorskip("transformer_lens.model_bridge")
    return model_bridge.TransformerBridge.boot_transformers(str(tiny.folder), hf_model=tiny.hf(),
                                                            tokenizer=tiny.tokenizer(), device="cpu")


def _bridge_patterns(bridge, ids: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    return logits, [cache[f"blocks.{layer}.attn.hook_pattern"].float() for layer in range(n_layers)]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _assert_not_uniform(pattern: torch.Tensor) -> None:
    """The parity is only meaningful if the patterns are far from uniform: the last query sees all SEQ keys
    (causal or not), and some head of it must put over half its weight on one key (uniform: 1/SEQ)."""
    assert pattern[..., -1, :].max().item() > 0.5, "patterns are near uniform: the parity check would be vacuous"


# 1. patterns: headlab vs TransformerBridge hook_pattern and HF eager

@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_patterns_match_bridge_hook_pattern_and_hf_eager(tiny, backend):
    """headlab's patterns (from its captured q and k) equal TB's and HF eager's, whichever backend it wraps.

    (Layer 0 differs only by the pattern formula; later layers add the drift of the wrapped backend's
    attention output, sdpa vs eager, in the layers before.)
    """
    model = hl.load(tiny.folder, device="cpu", attn_implementation=backend)
    run = model.run(tiny.ids)
    assert sorted(run.records) == list(range(model.n_layers))

    bridge = _boot_bridge(tiny)
    bridge_logits, bridge_patterns = _bridge_patterns(bridge, tiny.ids, model.n_layers)
    with torch.no_grad():
        eager = tiny.hf(attn_implementation="eager")(input_ids=tiny.ids, output_attentions=True)
    for layer in range(model.n_layers):
        ours = run.patterns(layer)
        assert ours.shape == (2, model.n_heads, SEQ, SEQ)
        _assert_not_uniform(ours)
        err_tb = _max_err(ours, bridge_patterns[layer])
        err_hf = _max_err(ours, eager.attentions[layer])
        _record(tiny.family, f"pattern: TB hook_pattern vs headlab[{backend}]", err_tb)
        _record(tiny.family, f"pattern: HF eager attentions vs headlab[{backend}]", err_hf)
        assert err_tb <= ATOL, f"layer {layer}: TB hook_pattern differs by {err_tb:.2e}"
        assert err_hf <= ATOL, f"layer {layer}: HF eager attentions differ by {err_hf:.2e}"
    err_logits = _max_err(run.logits, bridge_logits)
    _record(tiny.family, f"logits: TB vs headlab[{backend}]", err_logits)
    assert err_logits <= 1e-4


def test_wrapping_the_bridge_captures_edits_and_leaves_it_working(tiny):
    bridge = _boot_bridge(tiny)
    n_layers = 2
    logits_before, patterns_before = _bridge_patterns(bridge, tiny.ids, n_layers)

    wrapped = hl.load(bridge, device="cpu")
    assert wrapped.n_layers == n_layers
    run = wrapped.run(tiny.ids)
    # The bridge's GPT-2 and Llama attention components recompute attention instead of calling the HF
    # module: a headlab model that wrapped the bridged module tree in place captured nothing there.
    assert sorted(run.records) == list(range(n_layers))
    for layer in range(n_layers):
        err = _max_err(run.patterns(layer), patterns_before[layer])
        _record(tiny.family, "pattern: TB hook_pattern vs hl.load(bridge)", err)
        assert err <= ATOL
    assert _max_err(run.logits, logits_before) <= 1e-4

    # Edits on the wrapped bridge act, and act as they do on the same model loaded from its folder.
    head = hl.HeadRef(1, 2)
    folder_model = hl.load(tiny.folder, device="cpu", attn_implementation="eager")
    with torch.no_grad():
        with hl.edit(wrapped, hl.Ablate(head)):
            ablated = wrapped.hf(input_ids=tiny.ids).logits
        with hl.edit(folder_model, hl.Ablate(head)):
            ablated_folder = folder_model.hf(input_ids=tiny.ids).logits
    assert _max_err(ablated, run.logits) > 1e-3, "ablating a head of the wrapped bridge changed nothing"
    assert _max_err(ablated, ablated_folder) <= ATOL

    # The bridge itself is as it was: same hook_pattern and logits after wrapping (and after the edit).
    logits_after, patterns_after = _bridge_patterns(bridge, tiny.ids, n_layers)
    err_logits = _max_err(logits_after, logits_before)
    err_patterns = max(_max_err(a, b) for a, b in zip(patterns_after, patterns_before))
    _record(tiny.family, "bridge after hl.load(bridge): logits drift", err_logits)
    _record(tiny.family, "bridge after hl.load(bridge): pattern drift", err_patterns)
    assert err_logits <= ATOL and err_patterns <= ATOL


# 2. nnsight

def _nnsight_model(tiny: Tiny, how: str):
    nnsight = pytest.importorskip("nnsight")
    source = tiny.hf() if how == "module" else str(tiny.folder)
    return nnsight.TransformersModel(source, task="text-generation", tokenizer=tiny.tokenizer())


def _out_proj(lm, family: str, layer: int):
    return lm.transformer.h[layer].attn.c_proj if family == "gpt2" else lm.model.layers[layer].self_attn.o_proj


def _nnsight_zeroed_logits(lm, family: str, ids: torch.Tensor, layer: int, head: int, head_dim: int) -> torch.Tensor:
    """Logits of an nnsight trace that zeroes `head`'s slice of layer `layer`'s output-projection input."""
    import nnsight

    with torch.no_grad(), lm.trace(ids):
        z = _out_proj(lm, family, layer).input
        z[..., head * head_dim:(head + 1) * head_dim] = 0
        logits = nnsight.save(lm.output.logits)
    return logits


@pytest.mark.parametrize("how", ["module", "path"], ids=["from-module", "from-path-undispatched"])
def test_nnsight_wrap_gives_the_same_patterns(causal_lm, how):
    lm = _nnsight_model(causal_lm, how)
    wrapped = hl.load(lm, device="cpu")
    run = wrapped.run(causal_lm.ids)
    reference = hl.load(causal_lm.folder, device="cpu").run(causal_lm.ids)
    assert sorted(run.records) == list(range(wrapped.n_layers))
    for layer in range(wrapped.n_layers):
        err = _max_err(run.patterns(layer), reference.patterns(layer))
        _record(causal_lm.family, "pattern: hl.load(nnsight) vs hl.load(folder)", err)
        assert err <= ATOL


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 2)], ids=["L0H1", "L1H2"])
def test_zero_ablation_matches_nnsight(causal_lm, layer, head):
    lm = _nnsight_model(causal_lm, "module")
    model = hl.load(lm, device="cpu")
    ids = causal_lm.ids
    with torch.no_grad():
        clean = model.hf(input_ids=ids).logits
        with hl.edit(model, [hl.Ablate(hl.HeadRef(layer, head))]):
            ablated = model.hf(input_ids=ids).logits

    fresh = _nnsight_model(causal_lm, "module")  # a separate copy that headlab never wrapped
    by_fresh = _nnsight_zeroed_logits(fresh, causal_lm.family, ids, layer, head, model.head_dim)
    by_same = _nnsight_zeroed_logits(lm, causal_lm.family, ids, layer, head, model.head_dim)  # outside the scope

    assert _max_err(ablated, clean) > 1e-3, "zeroing the head changed nothing: the parity would be vacuous"
    err_fresh, err_same = _max_err(ablated, by_fresh), _max_err(ablated, by_same)
    _record(causal_lm.family, "ablation: nnsight (fresh copy) vs headlab", err_fresh)
    _record(causal_lm.family, "ablation: nnsight (same model) vs headlab", err_same)
    assert err_fresh <= ATOL and err_same <= ATOL
    # and once the edit scope is left the model is clean again
    with torch.no_grad():
        assert torch.equal(model.hf(input_ids=ids).logits, clean)
