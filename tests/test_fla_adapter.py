"""flash-linear-attention (fla) GLA and DeltaNet models through headlab: honest implicit patterns, edits, loading.

fla's own layers run only Triton kernels, so on CPU its forward cannot run: the CPU tests check headlab's
torch re-implementation against fla's naive torch references (fla.ops.*.naive) and the identity
pattern @ V == z; the comparison of the whole layer against fla's own forward needs CUDA.
"""

from __future__ import annotations

import contextlib

import pytest

fla = pytest.importorskip("fla", reason="flash-linear-attention is not installed: the fla adapter is not tested "
                                        "(pip install fla-core==0.6.0 flash-linear-attention==0.6.0)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GLAConfig, GLAForCausalLM  # noqa: E402
from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402

import headlab as hl  # noqa: E402
from headlab.errors import UnsupportedModelError  # noqa: E402
from headlab.heads import HeadRef  # noqa: E402
from headlab.models import fla_adapter  # noqa: E402  (registers model_types "gla" and "delta_net")

torch.set_num_threads(1)

VOCAB = 50
#: tiny variants: fla's defaults, and the other options the adapter implements
VARIANTS = {
    "gla": ("gla", {}),
    "gla-gqa-conv-unfused": ("gla", dict(num_kv_heads=2, use_short_conv=True, fuse_norm=False, clamp_min=-0.05)),
    "deltanet": ("deltanet", {}),
    "deltanet-gate-sum-noconv": ("deltanet", dict(use_gate=True, qk_norm="sum", use_short_conv=False,
                                                  qk_activation="elu", allow_neg_eigval=True)),
}


def make(variant: str, *, seed: int = 0, device: str = "cpu", hidden: int = 32):
    kind, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_heads=4, max_position_embeddings=64,
                  hidden_ratio=2, fuse_cross_entropy=False)
    if kind == "gla":
        model = GLAForCausalLM(GLAConfig(**common, **extra))
    else:
        with pytest.warns(UserWarning) if extra.get("use_short_conv") is False else contextlib.nullcontext():
            model = DeltaNetForCausalLM(DeltaNetConfig(**common, **extra))
    with torch.no_grad():  # larger weights than the init: patterns far from uniform, decays far from 1
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight")):
                p.normal_(0, 0.4)
            elif "gk_proj" in name or "conv1d" in name:
                p.normal_(0, 0.5)
    fla_adapter.torch_fallbacks(model)  # fla's block norms / MLPs are Triton: torch on CPU
    return model.eval().to(device)


def prompt():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 23), generator=g)
    return [ids[0].tolist(), ids[1, :17].tolist(), ids[2, :9].tolist()]  # right-padded by encode


def l2(x):  # fla's l2norm: x / sqrt(Σx² + 1e-6)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pattern_times_v_is_the_mixer_output(variant):
    model = hl.load(make(variant), device="cpu")
    assert model.layer_kinds == [VARIANTS[variant][0]] * 2
    assert (model.n_heads, model.n_kv_heads, model.head_dim) == (4, 4, 8)
    assert model.max_context == 64 and model.vocab_size == VOCAB and model.n_layers == 2
    run = model.run(prompt(), with_z=True)
    real = run.batch.attention_mask.bool()
    assert run.output.logits.isfinite().all()
    for layer, rec in run.records.items():
        assert rec.linear
        p = rec.pattern()
        assert p.shape == (3, 4, 23, 23)
        out = torch.matmul(p, rec.v.float()).transpose(1, 2)  # [B, Q, H, D]
        scale = max(1.0, rec.z.abs().max().item())
        err = (out - rec.z.float())[real].abs().max().item()
        assert err < 2e-6 * scale, (variant, layer, err)
        assert rec.z.abs().max() > 1e-3  # not trivially zero
        assert torch.all(p.triu(1) == 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixer_matches_flas_naive_reference(variant):
    """An independent check of the mixing math: fla's own naive recurrences on the same q, k, v, g / β."""
    kind = VARIANTS[variant][0]
    model = hl.load(make(variant), device="cpu")
    run = model.run(prompt(), with_z=True)
    lengths = run.batch.attention_mask.sum(1).tolist()
    caches = run.output.past_key_values  # the states the adapter wrote, in fla's layouts
    for layer, rec in run.records.items():
        module = model.attention_module(layer)
        for b, n in enumerate(lengths):
            q, k, v = rec.q[b:b + 1, :, :n].float(), rec.k[b:b + 1, :, :n].float(), rec.v[b:b + 1, :, :n].float()
            if kind == "gla":
                g = rec.mixer.g[b:b + 1, :, :n].float()
                o, state = naive_recurrent_gla(*(t.transpose(1, 2) for t in (q, k, v, g)), output_final_state=True)
                mine = caches[layer]["recurrent_state"][b:b + 1].transpose(-1, -2)  # fla's GLA layer: [V, K]
            else:
                norm = l2 if module.qk_norm == "l2" else (lambda t: F.normalize(t, p=1, dim=-1, eps=1e-6))
                o, state = delta_rule_recurrence(norm(q), norm(k), v, rec.mixer.beta[b:b + 1, :, :n].float())
                o = o.transpose(1, 2)
                mine = caches[layer]["recurrent_state"][b:b + 1]
            z = rec.z[b:b + 1, :n].float()
            scale = max(1.0, o.abs().max().item())
            assert (o - z).abs().max().item() < 1e-5 * scale, (variant, layer, b)
            assert (state - mine).abs().max().item() < 1e-5 * max(1.0, state.abs().max().item()), (variant, layer, b)


def test_short_conv_and_its_cache_follow_fla():
    """The short convolution is fla's ShortConvolution (a causal nn.Conv1d, SiLU); its cache keeps the last W inputs."""
    hf = make("deltanet")
    seen = {}
    attn = hf.model.layers[0].attn
    attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", kw["hidden_states"]), with_kwargs=True)
    model = hl.load(hf, device="cpu")
    run = model.run(prompt())
    x, real = seen["x"], run.batch.attention_mask.bool()
    conv = attn.q_conv1d
    W, T = conv.kernel_size[0], x.shape[1]
    with torch.no_grad():
        qx = attn.q_proj(x)
        ref = F.silu(torch.nn.Conv1d.forward(conv, qx.transpose(1, 2))[..., :T]).transpose(1, 2)
        mine = fla_adapter._conv(conv, qx)
    assert (ref - mine)[real].abs().max() < 1e-6
    state = run.output.past_key_values[0]["conv_state"][0]  # q's: [B, D, W]
    for b, n in enumerate(run.batch.attention_mask.sum(1).tolist()):
        want = torch.zeros(qx.shape[-1], W)
        take = qx[b, max(0, n - W):n].T
        want[:, W - take.shape[1]:] = take
        assert torch.allclose(state[b], want, atol=1e-6)


@pytest.mark.parametrize("variant", ["gla", "deltanet"])
def test_zero_ablation_changes_the_output_and_restores_exactly(variant):
    model = hl.load(make(variant), device="cpu")
    p = prompt()
    real = model.encode(p).attention_mask.bool()
    base = model.forward(p).logits
    inputs = {}
    o_proj = model.out_proj(0)
    hook = o_proj.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0]))
    with hl.edit(model, hl.ablate(HeadRef(0, 1), how="zero")):
        edited = model.forward(p).logits
    hook.remove()
    assert (edited - base)[real].abs().max() > 1e-4
    # z is before fla's per-head RMSNorm: zeroing head 1's z zeroes exactly its slice of o_proj's input
    D = model.head_dim
    assert torch.all(inputs["x"][..., D:2 * D] == 0) and inputs["x"][..., :D].abs().max() > 0
    with hl.edit(model, hl.ablate(HeadRef(1, 2), how="uniform")):
        uniform = model.forward(p).logits
    assert (uniform - base)[real].abs().max() > 1e-4
    try:
        with hl.edit(model, hl.Scale(HeadRef(1, 0), factor=0.0)):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.equal(model.forward(p).logits, base)
    # documented: a non-zero Scale acts on z before fla's per-head RMSNorm, which undoes it up to the norm's ε:
    # head 1's slice of o_proj's input is multiplied by c·√(m + ε) / √(c²m + ε), m = mean(z²) over the head
    c, eps = 3.0, model.hf.config.norm_eps
    z = model.run(p, layers=[0], with_z=True).records[0].z[:, :, 1].float()
    m = z.pow(2).mean(-1, keepdim=True)
    hook = o_proj.register_forward_pre_hook(lambda mod, a: inputs.__setitem__("x", a[0]))
    model.forward(p)
    plain = inputs["x"][..., D:2 * D]
    with hl.edit(model, hl.Scale(HeadRef(0, 1), factor=c)):
        model.forward(p)
    hook.remove()
    factor = c * torch.sqrt(m + eps) / torch.sqrt(c * c * m + eps)
    assert torch.allclose(inputs["x"][..., D:2 * D][real], (plain * factor)[real], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["gla", "deltanet"])
def test_load_object_and_saved_folder_give_the_same_patterns(variant, tmp_path):
    hf = make(variant)
    hf.save_pretrained(tmp_path)  # fla's import registered its Auto classes: the folder loads through them
    from_object = hl.load(hf, device="cpu")
    from_folder = hl.load(tmp_path, device="cpu")
    fla_adapter.torch_fallbacks(from_folder.hf)
    assert type(from_folder.hf).__name__ == type(hf).__name__
    assert from_folder.layer_kinds == from_object.layer_kinds
    p = prompt()
    a, b = from_object.run(p, with_z=True), from_folder.run(p, with_z=True)
    real = a.batch.attention_mask.bool()
    for layer in range(2):
        pa, pb = a.records[layer].pattern(), b.records[layer].pattern()
        mask = real[:, None, :, None].expand_as(pa)
        assert (pa - pb)[mask].abs().max() < 1e-6, layer
    assert (a.output.logits - b.output.logits)[real].abs().max() < 1e-5


def test_attach_is_idempotent_and_unsupported_options_are_refused():
    hf = make("gla")
    hl.load(hf, device="cpu")
    model = hl.load(hf, device="cpu")  # wrapping twice keeps fla's own forward as the original
    attn = model.attention_module(0)
    assert attn._headlab_fla_forward.__func__ is type(attn).forward
    ids = torch.tensor([prompt()[0]])
    out = hf(input_ids=ids, use_cache=True)
    with pytest.raises(UnsupportedModelError, match="cached recurrent state"):
        hf(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    x = torch.randn(1, 5, 32)
    with pytest.raises(UnsupportedModelError, match="cu_seqlens"):
        attn(x, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(UnsupportedModelError, match="right- or left-padded"):
        attn(torch.randn(1, 4, 32), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="feature map"):
        hl.load(GLAForCausalLM(GLAConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                         feature_map="relu")), device="cpu")


def test_left_padding_gives_the_same_real_outputs_as_right_padding():
    """fla drops padded tokens wherever they are; the torch path zeroes them, the same for a left-padded row."""
    attn = hl.load(make("deltanet"), device="cpu").attention_module(0)
    torch.manual_seed(3)
    x = torch.randn(1, 9, 32)
    left = torch.cat([torch.zeros(1, 4, 32), x], 1)
    with torch.no_grad():
        o_right = attn(x)[0]
        o_left = attn(left, attention_mask=torch.tensor([[0] * 4 + [1] * 9]))[0]
    assert (o_left[:, 4:] - o_right).abs().max() < 1e-6
    assert torch.all(o_left[:, :4] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's own forward runs only Triton kernels (needs CUDA)")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_path_matches_flas_own_forward_on_cuda(variant, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    from fla.models.cache_utils import Cache

    hf = make(variant, device="cuda", hidden=128)  # head dims 16 / 32: sizes fla's kernels are made for
    model = hl.load(hf, device="cuda")
    C = hf.config.hidden_size
    g = torch.Generator(device="cpu").manual_seed(2)
    for T in (23, 97):  # fla switches from its fused recurrent kernels (T <= 64) to its chunked ones
        tol = 1e-4 if T <= 64 else 2e-3  # the chunked kernels' tl.dot may use TF32
        x = torch.randn(3, T, C, generator=g).cuda()
        right = torch.ones(3, T, dtype=torch.long)
        right[1, T - 6:] = 0
        right[2, 9:] = 0
        left = right.flip(1)
        for mask in (None, right.cuda(), left.cuda()):
            real = torch.ones(3, T, dtype=torch.bool, device="cuda") if mask is None else mask.bool()
            for layer in range(2):
                attn = model.attention_module(layer)
                cache_fla, cache_mine = Cache.from_legacy_cache(None), Cache.from_legacy_cache(None)
                with torch.no_grad():
                    ref = attn._headlab_fla_forward(x, attention_mask=mask, past_key_values=cache_fla,
                                                    use_cache=True)[0]
                    mine = fla_adapter.torch_forward(attn, x, attention_mask=mask, past_key_values=cache_mine,
                                                     use_cache=True)[0]
                scale = ref.abs().max().item()
                assert (ref - mine)[real].abs().max().item() <= tol * scale, (variant, T, layer)
                assert torch.all(mine[~real] == 0)
                sa, sb = cache_fla[layer], cache_mine[layer]
                ra, rb = sa["recurrent_state"].float(), sb["recurrent_state"].float()
                assert (ra - rb).abs().max().item() <= tol * max(1.0, ra.abs().max().item()), (variant, T, layer)
                if sa["conv_state"] is not None:
                    for ca, cb in zip(sa["conv_state"], sb["conv_state"]):
                        assert (ca.float() - cb.float()).abs().max().item() < 1e-5
    # the whole model: plain forwards run fla's kernels, captures run the torch path through the seam
    p = prompt()
    real = model.encode(p).attention_mask.bool()
    plain = model.forward(p).logits
    captured = model.run(p, with_z=True)
    assert (plain - captured.output.logits)[real].abs().max().item() <= 1e-4 * plain.abs().max().item()
    for rec in captured.records.values():
        out = torch.matmul(rec.pattern(), rec.v.float()).transpose(1, 2)
        assert (out - rec.z.float())[real].abs().max().item() < 1e-5 * max(1.0, rec.z.abs().max().item())
