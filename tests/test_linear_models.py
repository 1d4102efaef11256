"""headlab's linear-attention LMs: HF plumbing, honest implicit patterns (pattern @ v == output), edits, stats."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.capture import attend
from headlab.heads import HeadRef
from headlab.models.linear import KINDS, HeadlabLinearConfig, HeadlabLinearForCausalLM

STACKS = {kind: [kind, kind] for kind in KINDS}
STACKS["hybrid"] = ["swa", "deltanet", "gla"]
STACKS["based+swa"] = ["swa", "based"]


def make(kinds, *, seed=0, mlp=48, **kw):
    torch.manual_seed(seed)
    cfg = HeadlabLinearConfig(vocab_size=50, hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=2,
                              intermediate_size=mlp, layer_kinds=list(kinds), window=5, based_feature_dim=8,
                              max_position_embeddings=64, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so patterns are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.4)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 23), generator=g)
    return [ids[0].tolist(), ids[1, :17].tolist(), ids[2, :9].tolist()]  # right-padded by encode


@pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
def test_pattern_times_v_is_the_layer_output(stack):
    model = hl.load(make(STACKS[stack]), device="cpu")
    run = model.run(batch(), with_z=True)
    real = run.batch.attention_mask.bool()
    for layer, rec in run.records.items():
        p = rec.pattern()  # [B, H, Q, S]
        assert p.shape == (3, 2, 23, 23)
        out = torch.matmul(p, rec.v.float()).transpose(1, 2)  # [B, Q, H, D]
        err = (out - rec.z.float())[real].abs().max().item()
        assert err < 2e-6 * max(1.0, rec.z.abs().max().item()), (stack, layer, err)
        assert torch.all(p.triu(1) == 0), "causal: nothing above the diagonal"
        if model.layer_kinds[layer] in ("softmax", "swa", "linear", "hedgehog", "based"):
            sums = p.sum(-1)[real[:, None].expand_as(p.sum(-1))]
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-4)  # 1 - ε/(row sum + ε)
            assert p.min() >= 0


def test_softmax_layers_match_eager_weights_and_wrapping_changes_nothing():
    hf = make(["swa", "linear", "softmax"])
    enc = hl.load(hf, device="cpu").encode(batch())
    ids, mask = enc.input_ids, enc.attention_mask
    ref = make(["swa", "linear", "softmax"])  # the same seed: the same weights, unwrapped, eager
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        plain = ref(input_ids=ids, attention_mask=mask).logits
        wrapped = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (plain - wrapped)[real].abs().max() < 1e-5
    weights = {}
    for i, block in enumerate(ref.model.layers):
        block.attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)
    run = hl.load(hf, device="cpu").run(enc)
    for layer in (0, 2):
        p = run.patterns(layer)
        w = weights[layer].float()
        assert (p - w)[real[:, None, :, None].expand_as(p)].abs().max() < 1e-6
    # the window: layer 0 sees at most 5 keys per query
    assert int((run.patterns(0)[0, 0] > 0).sum(-1).max()) == 5


def test_folder_round_trip_auto_classes_and_generate(tmp_path):
    hf = make(["gla", "deltanet"])
    hf.save_pretrained(tmp_path)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "HeadlabLinearForCausalLM"
    model = hl.load(tmp_path, device="cpu")
    assert model.layer_kinds == ["gla", "deltanet"] and model.n_heads == 2
    ids = torch.tensor([batch()[0]])
    with torch.no_grad():
        assert torch.allclose(model.hf(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-6)
        gen = model.hf.generate(ids[:, :5], max_new_tokens=4, do_sample=False, use_cache=False)
    assert gen.shape == (1, 9)
    with torch.no_grad():  # greedy steps are the argmax of a full rerun
        assert int(model.hf(input_ids=gen[:, :5]).logits[0, -1].argmax()) == int(gen[0, 5])


def test_edits_on_linear_heads_restore_exactly_and_overrides_use_the_implicit_pattern():
    model = hl.load(make(["deltanet", "linear"]), device="cpu")
    prompt = batch()
    base = model.forward(prompt).logits
    for how in ("zero", "uniform"):
        with hl.edit(model, hl.ablate(HeadRef(0, 1), how=how)):
            edited = model.forward(prompt).logits
        assert (edited - base).abs().max() > 1e-4, how
    try:
        with hl.edit(model, hl.Scale(HeadRef(1, 0), factor=0.0)):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.equal(model.forward(prompt).logits, base)
    # an override that re-applies the implicit pattern changes nothing
    from headlab.capture import HeadOverride, LayerOps

    class Same:
        def layer_ops(self, m):
            return {0: LayerOps(overrides=(HeadOverride((0, 1), lambda rec, heads: attend(rec, heads)),))}

    with hl.edit(model, Same()):
        same = model.forward(prompt).logits
    real = model.encode(prompt).attention_mask.bool()
    assert (same - base)[real].abs().max() < 1e-5


def test_stats_of_linear_layers_agree_with_the_explicit_pattern():
    model = hl.load(make(["gla", "hedgehog"]), device="cpu")
    prompt = batch()
    run = model.run(prompt)
    st = model.stats(prompt, topk=2, key_sets={"first": torch.arange(23)[None].expand(3, -1) == 0})
    real = run.batch.attention_mask.bool()
    for layer in (0, 1):
        p = run.patterns(layer) * real[:, None, :, None] * real[:, None, None, :]
        s = st.layers[layer]
        assert torch.allclose(s.received, p.sum(2), atol=1e-5)
        assert torch.allclose(s.set_mass[..., 0], p[..., 0], atol=1e-6)
        top = p.abs().argmax(-1)
        hit = s.topk_idx[..., 0] == top
        assert hit[real[:, None].expand_as(hit)].float().mean() > 0.99
        assert torch.isnan(s.lse).all()
    # the induction scan's pair weights read the implicit pattern too
    from headlab.stats import pair_weights

    rec = run.records[1]
    qp, kp = torch.tensor([4, 8, 8, 2]), torch.tensor([1, 8, 3, 5])
    w = pair_weights(rec, st.layers[1].lse, qp, kp)
    full = rec.pattern()
    assert torch.allclose(w, full[:, :, qp, kp], atol=1e-7)


def test_bad_config_and_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="unknown layer kind"):
        HeadlabLinearConfig(layer_kinds=["linear", "mamba"])
    with pytest.raises(ValueError, match="2 layers"):
        HeadlabLinearConfig(num_hidden_layers=2, layer_kinds=["gla"])
    model = hl.load(make(["linear"]), device="cpu")
    with pytest.raises(hl.PromptError, match="longer than"):
        model.run(list(range(40)) * 2)
    with pytest.raises(hl.HeadIndexError):
        model.run([1, 2, 3], heads=[HeadRef(0, 2)])


def test_nnsight_wraps_a_linear_model():
    nnsight = pytest.importorskip("nnsight")
    hf = make(["gla", "softmax"])
    from headlab.models.linear.tokenizer import byte_tokenizer

    lm = nnsight.LanguageModel(hf, tokenizer=byte_tokenizer())
    model = hl.load(lm, device="cpu")
    run = model.run([[3, 4, 5, 6, 7]], with_z=True)
    rec = run.records[0]
    assert torch.allclose(torch.matmul(rec.pattern(), rec.v).transpose(1, 2), rec.z, atol=1e-6)


TWINS = [f"{task}-{kind}" for task in ("recall", "text")
         for kind in ("softmax", "linear", "hedgehog", "based", "gla", "deltanet")]


@pytest.mark.parametrize("name", TWINS)
def test_trained_twins_load_and_their_patterns_are_honest(name):
    """pattern @ V == the layer's output on the committed trained twins too (not only at init)."""
    model = hl.load(f"twin-{name}", device="cpu")
    if name.startswith("recall"):
        from headlab.models.linear.train import recall_eval_batch

        ids, _ = recall_eval_batch(4, 16, seed=0)
    else:
        ids = model.encode(["In the beginning was the Word,", "And God said, Let there be light"]).input_ids
    run = model.run(ids, with_z=True)
    real = run.batch.attention_mask.bool()
    for layer, rec in run.records.items():
        out = torch.matmul(rec.pattern(), rec.v.float()).transpose(1, 2)
        scale = rec.z.abs().max().item()
        assert (out - rec.z)[real].abs().max().item() <= 2e-6 * max(1.0, scale), (name, layer)


def test_train_twins_cli_writes_a_card_and_resumes(tmp_path, capsys):
    from headlab.cli import main

    args = ["train", "twins", "--tasks", "recall", "--kinds", "gla", "--steps", "3", "--out", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    folder = tmp_path / "recall-gla"
    assert {"config.json", "model.safetensors", "run.json", "README.md"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "run.json").stat().st_mtime_ns
    assert main(args) == 0  # resumes: the finished twin is kept
    assert (folder / "run.json").stat().st_mtime_ns == stamp
    assert "recall-gla" in capsys.readouterr().out
    assert hl.load(folder, device="cpu").layer_kinds == ["gla", "gla"]
    assert main(["train", "twins", "--kinds", "mamba", "--out", str(tmp_path)]) == 2


def test_deltanet_state_is_the_closed_form():
    """LinearMixer.state (the chunked kernel's final state) = Kᵀ U, U = (I + strict_tril(diag(β) K Kᵀ))⁻¹ diag(β) V —
    what fla's DeltaNet cache holds (the adapter writes mixer.state)."""
    from headlab.models.linear.mixer import LinearMixer

    g = torch.Generator().manual_seed(0)
    B, H, T, K, V = 2, 3, 37, 8, 5
    fk = torch.nn.functional.normalize(torch.randn(B, H, T, K, generator=g), dim=-1)
    beta = torch.rand(B, H, T, generator=g)
    v = torch.randn(B, H, T, V, generator=g)
    a = torch.tril(beta[..., None] * (fk @ fk.transpose(-1, -2)), diagonal=-1)
    u = torch.linalg.solve(torch.eye(T) + a, beta[..., None] * v)
    expected = fk.transpose(-1, -2) @ u
    got = LinearMixer(kind="deltanet", fq=fk, fk=fk, beta=beta).state(v)
    assert got.shape == (B, H, K, V) and torch.allclose(got, expected, atol=1e-4)
