"""Short convolutions on the q, k, v of headlab's linear-attention LMs (HeadlabLinearConfig.short_conv).

Checked against torch's own nn.Conv1d (causal by padding K − 1 and cutting the tail) on the recorded projections; the
seam stays honest (pattern @ v == the layer output with the convolved q, k, v); padding never reaches a real token
through the convolution; short_conv=0 is the model before the option (the committed twins re-evaluate to the losses
their run.json recorded before it existed). Cached decoding with it: tests/test_linear_decode.py (conv-* stacks).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import headlab as hl
from headlab.inputs import mqar
from headlab.models.linear import KINDS, HeadlabLinearConfig, HeadlabLinearForCausalLM
from headlab.models.linear.conv import ShortConv
from headlab.models.linear.train import TwinParams, evaluate, evaluate_mqar
from headlab.paths import MQAR_TWINS_DIR, TWINS_DIR

torch.set_num_threads(1)

STACKS = {kind: [kind, kind] for kind in KINDS}
STACKS["hybrid"] = ["swa", "deltanet", "gla", "based"]
K = 4


def make(kinds, *, short_conv=K, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("max_position_embeddings", 64)
    cfg = HeadlabLinearConfig(vocab_size=50, hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=2,
                              intermediate_size=48, layer_kinds=list(kinds), window=5, based_feature_dim=8,
                              short_conv=short_conv, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so patterns are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.4)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, 13), generator=g)
    return [ids[0].tolist(), ids[1, :9].tolist(), ids[2, :2].tolist()]  # right-padded by encode


def torch_reference(conv: ShortConv, x: torch.Tensor) -> torch.Tensor:
    """SiLU(nn.Conv1d(depthwise, padding K − 1)(x)) with the tail cut: the causal convolution the way torch users
    write it, on x `[B, T, C]`."""
    C, Kc = conv.channels, conv.kernel
    ref = torch.nn.Conv1d(C, C, Kc, groups=C, padding=Kc - 1, bias=False)
    ref.weight.data.copy_(conv.weight.data)
    return F.silu(ref(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))


@pytest.mark.parametrize("stack", list(STACKS))
def test_the_layers_mix_the_convolved_projections(stack):
    """The q, k, v the seam records are torch's causal depthwise convolution (then SiLU) of the projections, with the
    padded inputs zeroed; and pattern @ v is still the layer's output."""
    model = hl.load(make(STACKS[stack]), device="cpu")
    inputs = {}
    for i, block in enumerate(model.hf.model.layers):
        block.attn.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, a[0]), with_kwargs=True)
    run = model.run(batch(), with_z=True)
    real = run.batch.attention_mask.bool()
    for layer, rec in run.records.items():
        attn = model.hf.model.layers[layer].attn
        x = inputs[layer] * real[..., None]
        for name, got in (("q", rec.q), ("k", rec.k), ("v", rec.v)):
            proj, conv = getattr(attn, f"{name}_proj"), getattr(attn, f"{name}_conv")
            want = torch_reference(conv, proj(x)).view(*x.shape[:2], attn.num_heads, -1).transpose(1, 2)
            assert (got - want).abs().max() < 1e-6, (stack, layer, name)
        p = rec.pattern()
        out = torch.matmul(p, rec.v.float()).transpose(1, 2)
        err = (out - rec.z.float())[real].abs().max().item()
        assert err < 2e-6 * max(1.0, rec.z.abs().max().item()), (stack, layer, err)


@pytest.mark.parametrize("stack", ["softmax", "swa", "linear", "hedgehog", "based", "gla", "deltanet", "hybrid"])
def test_padding_does_not_reach_real_tokens_through_the_convolution(stack):
    """Left padding: whatever the padded slots hold, the real tokens' logits are those of the unpadded row (no learned
    positions, RoPE on the softmax layers: nothing else tells a padded row apart)."""
    model = make(STACKS[stack], position="rotary", max_position_embeddings=None)
    g = torch.Generator().manual_seed(3)
    real = torch.randint(1, 50, (1, 7), generator=g)
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(real).logits[0]
        for fill in (0, 17, 49):
            ids = torch.cat([torch.full((1, 5), fill), real], 1)
            padded = model(ids, attention_mask=mask).logits[0, 5:]
            assert (padded - alone).abs().max() < 1e-5, (stack, fill)


def test_without_zeroing_the_padding_would_leak():
    """The check above can fail: the same left-padded row without its mask differs at the first real tokens (the
    convolution reads the padded slots there)."""
    model = make(["gla", "gla"], position="none", max_position_embeddings=None)
    real = torch.randint(1, 50, (1, 7), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.full((1, 5), 17), real], 1)
    with torch.no_grad():
        alone = model(real).logits[0]
        unmasked = model(ids).logits[0, 5:]
        masked = model(ids, attention_mask=(torch.arange(12) >= 5).long()[None]).logits[0, 5:]
    assert (masked - alone).abs().max() < 1e-5 and (unmasked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["softmax-h64", "gla-h64", "deltanet-h64"])
def test_short_conv_zero_is_the_model_before_the_option(name):
    """A model saved before short_conv existed loads with none (no convolution weights, no missing keys) and scores
    the MQAR loss its run.json recorded at training time, before the option was added."""
    folder = MQAR_TWINS_DIR / name
    assert "short_conv" not in json.loads((folder / "config.json").read_text())
    model, info = HeadlabLinearForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.short_conv == 0
    assert not any("conv" in n for n, _ in model.named_parameters())
    run = json.loads((folder / "run.json").read_text())
    params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
    assert params.short_conv == 0
    got = evaluate_mqar(model.eval(), params, lengths=(256,))["lengths"]["256"]
    want = run["eval"]["lengths"]["256"]
    assert got["accuracy"] == want["accuracy"] and abs(got["loss"] - want["loss"]) <= 1e-6 * want["loss"]


def test_a_recall_twin_scores_what_it_scored_before_the_option():
    folder = TWINS_DIR / "recall-deltanet"
    run = json.loads((folder / "run.json").read_text())
    model = HeadlabLinearForCausalLM.from_pretrained(folder)
    params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
    ev = evaluate(model, params)
    for period, want in run["eval"]["periods"].items():
        assert abs(ev["periods"][period]["loss"] - want["loss"]) <= 1e-6 * max(1.0, want["loss"]), period


def test_config_round_trip_and_errors(tmp_path):
    model = make(["swa", "gla"], short_conv=2)
    attn = model.model.layers[1].attn
    assert attn.q_conv.weight.shape == (32, 1, 2) and attn.v_conv.weight.shape == (32, 1, 2)
    assert "bias=False" in repr(attn.q_conv)
    model.save_pretrained(tmp_path)
    again, info = HeadlabLinearForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert again.config.short_conv == 2 and not info["missing_keys"]
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, model(ids).logits)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="short_conv"):
            HeadlabLinearConfig(short_conv=bad)
    with pytest.raises(ValueError, match="kernel"):
        ShortConv(8, 0)
    with pytest.raises(ValueError, match="expected"):
        attn.q_conv(torch.zeros(2, 3, 32), past=torch.zeros(2, 3, 32))


@pytest.mark.parametrize("name", ["softmax-conv4-h64", "hedgehog-conv4-h64"])
def test_committed_conv_twins_decode_as_the_prefix_rerun(name):
    """A trained MQAR twin with short convolutions: cached greedy decoding (left-padded batch) gives the prefix rerun's
    tokens, and it answers the queries it was trained on (the conv carries the key into the value's position)."""
    folder = MQAR_TWINS_DIR / name
    model = HeadlabLinearForCausalLM.from_pretrained(folder).eval()
    assert model.config.short_conv == K
    run = json.loads((folder / "run.json").read_text())
    params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
    ids, answers = mqar(2, 96, params.mqar_pairs, params.mqar_vocab, seed=7)
    ids, mask = ids[:, :80], torch.ones(2, 80, dtype=torch.long)
    mask[1, :5] = 0  # row 1: 5 slots of left padding (whatever they hold)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        rerun = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               use_cache=False)
        assert torch.equal(cached, rerun)
        logits = model(ids[:1]).logits[0, :-1]
    where = answers[0, 1:80]
    right = (logits.argmax(-1) == ids[0, 1:])[where].float().mean().item()
    assert right > 0.8, right  # trained: 1.000 / 0.906 on held-out training-like sequences
