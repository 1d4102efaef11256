"""The nnsight trace path (headlab.models.nnsight_trace) against headlab's seam.

`NNsightHeads` reaches heads without the seam: q/k/v from the projections saved inside an nnsight trace, rotated
with the family's own `apply_rotary_pos_emb` and the position embeddings the decoder passed to that layer; z edits
and activation patching by setting a head's slice of `o_proj`'s input inside the trace. Every check compares with
`hl.load(folder)` (the seam) on the same weights: patterns of every layer, q/k, z, logits, and logits under zero
ablation, scaling and z patching. Each trace runs twice: locally (`remote=False`) and through nnsight's
serialise-and-run dry run of the remote path (`remote="local"`: the request is serialised with local modules
shipped by value and run from the deserialised copy, as NDIF would). Remote execution on NDIF itself
(`remote=True`) needs the network and an API key and is not tested here.

Models: the tiny random Llama (GQA) and Qwen2 (one KV group) of tests/conftest.py with weights drawn at std 0.3
(patterns far from uniform, so a parity check is not vacuous), and SmolLM2-135M (slow).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import headlab as hl
from headlab.errors import EditError, HeadIndexError, PromptError, UnsupportedModelError
from headlab.models.nnsight_trace import NNsightHeads, ZEdit, z_edits
from tests.conftest import tiny_config

nnsight = pytest.importorskip("nnsight")

ATOL = 1e-5
ERRORS: dict[str, float] = {}
IDS = [[5, 9, 2, 17, 9, 2, 17, 30, 4, 11, 5, 9], [7, 3, 3, 21, 8]]
REMOTES = [False, "local"]


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\nnnsight trace path vs headlab's seam: max abs errors (float32)")
        for name, err in sorted(ERRORS.items()):
            print(f"  {name:60s} {err:.3e}")


def _err(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.float() - b.float()).abs().max())
    ERRORS[name] = max(ERRORS.get(name, 0.0), err)
    return err


def _tokenizer(vocab_size: int):
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="[BOS]", eos_token="[EOS]")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(family, the seam's HeadModel, an nnsight model of the same folder), weights at std 0.3."""
    family = request.param
    cls, config = tiny_config(family)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"nn-{family}")
    cls(config).eval().save_pretrained(folder)
    tok = _tokenizer(config.vocab_size)
    tok.save_pretrained(folder)
    lm = nnsight.TransformersModel(str(folder), task="text-generation", tokenizer=tok)
    return family, hl.load(folder, device="cpu"), lm


@pytest.mark.parametrize("remote", REMOTES, ids=["remote=False", "remote=local"])
def test_patterns_qk_z_and_logits_equal_the_seam(pair, remote):
    family, seam, lm = pair
    heads = NNsightHeads(lm, remote=remote)
    assert (heads.n_layers, heads.n_heads, heads.n_kv_heads, heads.head_dim) == \
        (seam.n_layers, seam.n_heads, seam.n_kv_heads, seam.head_dim)
    traced, ref = heads.run(IDS, with_z=True), seam.run(IDS, with_z=True)
    assert traced.remote == remote
    assert _err(f"{family}: logits", traced.logits, ref.logits) <= ATOL
    for layer in range(seam.n_layers):
        t, r = traced.records[layer], ref.records[layer]
        assert t.q.shape == r.q.shape and t.k.shape == r.k.shape  # [B, H, T, D] and [B, G, T, D]
        assert _err(f"{family}: post-RoPE q", t.q, r.q) <= ATOL
        assert _err(f"{family}: post-RoPE k", t.k, r.k) <= ATOL
        assert _err(f"{family}: z", t.z, r.z) <= ATOL
        p = traced.patterns(layer)
        assert p.shape == (2, seam.n_heads, 12, 12)
        assert _err(f"{family}: patterns [B, H, Q, S]", p, ref.patterns(layer)) <= ATOL
    # not vacuous: sharp patterns, and the short prompt's padded keys get nothing
    assert float(traced.patterns(1).max()) > 0.9
    assert float(traced.patterns(0)[1, :, :, 5:].abs().max()) == 0.0
    head = hl.HeadRef(1, 3)
    assert _err(f"{family}: pattern(head)", traced.pattern(head), ref.pattern(head)) <= ATOL


def test_rotary_is_applied(pair):
    """Without the rotation the saved projections give other patterns: the rotary step is doing work."""
    family, seam, lm = pair
    heads = NNsightHeads(lm)
    rotated = heads.run(IDS, layers=[1]).patterns(1)
    heads._rotate = lambda q, k, cos, sin: (q, k)  # the same trace with the rotation left out
    plain = heads.run(IDS, layers=[1]).patterns(1)
    assert float((plain - rotated).abs().max()) > 1e-2
    assert _err(f"{family}: patterns [B, H, Q, S]", rotated, seam.run(IDS, layers=[1]).patterns(1)) <= ATOL


@pytest.mark.parametrize("remote", REMOTES, ids=["remote=False", "remote=local"])
def test_edits_equal_the_seam(pair, remote):
    family, seam, lm = pair
    heads = NNsightHeads(lm, remote=remote)
    clean = seam.forward(IDS).logits
    edits = [hl.Ablate(hl.HeadRef(0, 1)), hl.Scale(hl.HeadRef(1, 2), factor=0.3)]
    with hl.edit(seam, edits):
        edited = seam.run(IDS, with_z=True)
    traced = heads.run(IDS, edits=edits, with_z=True)
    assert float((edited.logits - clean).abs().max()) > 1e-2, "the edits changed nothing: the parity is vacuous"
    assert _err(f"{family}: edited logits (zero, scale)", traced.logits, edited.logits) <= ATOL
    assert _err(f"{family}: edited z", traced.z(hl.HeadRef(1, 2)), edited.records[1].z[:, :, 2]) <= ATOL
    assert float(traced.z(hl.HeadRef(0, 1)).abs().max()) == 0.0
    # the same edits as ZEdit specs
    same = heads.run(IDS, layers=[], edits=[ZEdit((0, 1), scale=0.0), ZEdit("L1H2", scale=0.3)])
    assert torch.equal(same.logits, traced.logits)


@pytest.mark.parametrize("remote", REMOTES, ids=["remote=False", "remote=local"])
def test_activation_patching_equals_the_seam(pair, remote):
    family, seam, lm = pair
    heads = NNsightHeads(lm, remote=remote)
    source = [[4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42]]
    target = [IDS[0]]
    head = hl.HeadRef(0, 2)
    z_traced = heads.run(source, layers=[0], with_z=True).z(head)
    z_seam = seam.run(source, layers=[0], with_z=True).records[0].z[:, :, 2]
    assert _err(f"{family}: source z", z_traced, z_seam) <= ATOL
    for positions in (None, [6, 7]):
        patch = hl.Patch(head, z=z_seam, positions=positions)
        with hl.edit(seam, [patch]):
            a = seam.forward(target).logits
        b = heads.run(target, layers=[], edits=[patch]).logits
        c = heads.run(target, layers=[], edits=[ZEdit(head, value=z_traced, positions=positions)]).logits
        assert float((a - seam.forward(target).logits).abs().max()) > 1e-3
        assert _err(f"{family}: patched logits", a, b) <= ATOL
        assert _err(f"{family}: patched logits (ZEdit)", a, c) <= ATOL


def test_bad_inputs_are_refused(pair):
    family, seam, lm = pair
    heads = NNsightHeads(lm)
    with pytest.raises(EditError, match="mean"):
        heads.run(IDS, edits=[hl.Ablate(hl.HeadRef(0, 0), how="mean", reference=IDS)])
    with pytest.raises(EditError, match="sets heads' z only"):
        z_edits([hl.Patch(hl.HeadRef(0, 0), q=torch.zeros(1, 12, seam.head_dim))])
    with pytest.raises(EditError, match="does not fit"):
        heads.run(IDS, edits=[ZEdit((0, 0), value=torch.zeros(1, 3, seam.head_dim))])
    with pytest.raises(EditError, match="finite"):
        ZEdit((0, 0), scale=float("nan"))
    with pytest.raises(HeadIndexError, match="out of range"):
        heads.run(IDS, layers=[5])
    with pytest.raises(HeadIndexError, match="out of range"):
        heads.run(IDS, edits=[ZEdit((0, 9), scale=0.0)])
    with pytest.raises(PromptError, match=f"0..{seam.vocab_size - 1}"):
        heads.run([[1, 2, 999]])
    with pytest.raises(PromptError):
        heads.run([])
    with pytest.raises(UnsupportedModelError, match="nnsight model"):
        NNsightHeads(seam.hf)
    with pytest.raises(KeyError, match="with_z"):
        heads.run(IDS, layers=[0]).z(hl.HeadRef(0, 0))


def test_sliding_window_equals_the_seam(tmp_path):
    """Mistral with a 4-token window on 12-token prompts: the trace path's mask keeps only the window, as the seam's."""
    cls, config = tiny_config("mistral")
    config.sliding_window, config.initializer_range = 4, 0.3
    torch.manual_seed(1)
    cls(config).eval().save_pretrained(tmp_path)
    tok = _tokenizer(config.vocab_size)
    tok.save_pretrained(tmp_path)  # the same pad id on both sides (padded query rows see the pad token's q)
    seam = hl.load(tmp_path, device="cpu")
    traced = NNsightHeads(nnsight.TransformersModel(str(tmp_path), task="text-generation", tokenizer=tok)).run(IDS)
    ref = seam.run(IDS)
    for layer in range(seam.n_layers):
        assert _err("mistral (window 4): patterns", traced.patterns(layer), ref.patterns(layer)) <= ATOL
        assert float(traced.patterns(layer)[0, :, 11, :8].abs().max()) == 0.0  # keys 0..7 are out of query 11's window
    assert _err("mistral (window 4): logits", traced.logits, ref.logits) <= ATOL


def test_other_families_are_refused(tiny_folder):
    cls, config = tiny_config("gpt2")
    lm = nnsight.TransformersModel(cls(config), task="text-generation", tokenizer=_tokenizer(config.vocab_size))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2.*'gpt2'"):
        NNsightHeads(lm)


@pytest.mark.slow
def test_smollm2_trace_path_equals_the_seam():
    from headlab.models.bundled import BUNDLED

    folder = BUNDLED["smollm2-135m"].folder()
    seam = hl.load("smollm2-135m", device="cpu")
    lm = nnsight.TransformersModel(str(folder), task="text-generation", tokenizer=seam.tokenizer)
    heads = NNsightHeads(lm)
    prompt = ["The cat sat on the mat. The cat sat on the", "One two three four"]
    layers = [0, 3, 15, 29]
    traced, ref = heads.run(prompt, layers=layers), seam.run(prompt, layers=layers)
    assert torch.equal(traced.batch.input_ids[traced.batch.attention_mask.bool()],
                       ref.batch.input_ids[ref.batch.attention_mask.bool()])
    assert _err("smollm2: logits", traced.logits, ref.logits) <= 1e-4
    for layer in layers:
        assert _err("smollm2: patterns", traced.patterns(layer), ref.patterns(layer)) <= 1e-5
    edits = [hl.Ablate(hl.HeadRef(15, 4)), hl.Scale(hl.HeadRef(3, 1), factor=0.0), hl.Scale(hl.HeadRef(29, 8),
                                                                                             factor=2.0)]
    with hl.edit(seam, edits):
        edited = seam.run(prompt, layers=[15])
    a = edited.logits
    b = heads.run(prompt, layers=[], edits=edits).logits
    assert float((a - ref.logits).abs().max()) > 1e-3
    assert _err("smollm2: edited logits", a, b) <= 1e-4
    c = NNsightHeads(lm, remote="local").run(prompt, layers=[15], edits=edits)
    assert _err("smollm2: edited logits (remote=local)", a, c.logits) <= 1e-4
    assert _err("smollm2: patterns under edits (remote=local)", c.patterns(15), edited.patterns(15)) <= 1e-5
    assert float((edited.patterns(15) - ref.patterns(15)).abs().max()) > 1e-4  # the L3 edit reaches layer 15
