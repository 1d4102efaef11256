"""Composition scores (headlab.circuits.composition): the low-rank computation against the dense definition, GQA,
a planted K-composition circuit, Talking Heads' rank-1 split, persistence and bad inputs."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.circuits.composition import (
    CompositionScores,
    component_shares,
    composition_scores,
    head_matrices,
    precision_at_k,
    random_baseline,
    talking_heads,
)
from headlab.errors import HeadIndexError, UnsupportedModelError
from headlab.heads import HeadRef
from headlab.results import ResultError

D_MODEL = 32


def _llama(layers=3, heads=4, kv=2, seed=0):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=D_MODEL, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, intermediate_size=48, max_position_embeddings=32)
    model = T.LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:  # non-trivial gains, so that folding them is checked
        layer.input_layernorm.weight.data = torch.rand(D_MODEL) + 0.5
    return hl.HeadModel(model)


def _gpt2(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=50, n_embd=D_MODEL, n_layer=layers, n_head=4, n_positions=32)
    model = T.GPT2LMHeadModel(cfg).eval()
    for block in model.transformer.h:
        block.ln_1.weight.data = torch.rand(D_MODEL) + 0.5
        block.ln_1.bias.data.zero_()  # biases are outside the per-head matrices
        block.attn.c_attn.bias.data.zero_()
    return hl.HeadModel(model)


def _linear_lm(kinds, **kw):
    torch.manual_seed(0)
    cfg = hl.models.linear.HeadlabLinearConfig(vocab_size=50, hidden_size=D_MODEL, num_hidden_layers=len(kinds),
                                               num_attention_heads=4, layer_kinds=list(kinds), **kw)
    model = hl.models.linear.HeadlabLinearForCausalLM(cfg).eval()
    for block in model.model.layers:
        block.ln_attn.weight.data = torch.rand(D_MODEL) + 0.5
    return hl.HeadModel(model)


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _cs(a, b):
    return float((a @ b).norm() / (a.norm() * b.norm()))


def _dense(model):
    """The definition on materialised d×d matrices in float64 (TransformerLens's orders)."""
    m = head_matrices(model)
    L, H = model.n_layers, model.n_heads
    qk = [[m.w_q[l][h].double() @ m.w_k[l][h].double().T for h in range(H)] for l in range(L)]
    ov = [[m.w_v[l][h].double() @ m.w_o[l][h].double() for h in range(H)] for l in range(L)]
    out = {c: torch.zeros(L, H, L, H, dtype=torch.float64) for c in "qkv"}
    for ls in range(L):
        for hs in range(H):
            for lr in range(ls + 1, L):
                for hr in range(H):
                    out["q"][ls, hs, lr, hr] = _cs(ov[ls][hs], qk[lr][hr])
                    out["k"][ls, hs, lr, hr] = _cs(ov[ls][hs], qk[lr][hr].T)
                    out["v"][ls, hs, lr, hr] = _cs(ov[ls][hs], ov[lr][hr])
    return out, qk, ov


def _normalised(norm, x):
    """The norm's output before its gain (and bias) are applied."""
    if isinstance(norm, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# (a) the low-rank computation is the definition


@pytest.mark.parametrize("make", [_llama, _gpt2, lambda: _linear_lm(["softmax", "swa", "softmax"])],
                         ids=["llama", "gpt2", "headlab_linear"])
def test_low_rank_scores_equal_the_dense_definition(make):
    model = make()
    scores = composition_scores(model, progress=False)
    dense, _, _ = _dense(model)
    for c in "qkv":
        assert scores.channel(c).dtype == torch.float32
        torch.testing.assert_close(scores.channel(c).double(), dense[c], atol=2e-6, rtol=1e-5)
        assert (scores.channel(c)[~scores.valid()] == 0).all()
        assert scores.channel(c)[scores.valid()].gt(0).all()


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_head_matrices_reproduce_the_projections_of_the_normed_input(make):
    """x̂ W_Q^h (gain folded) is head h's slice of the module's q projection of norm(x); same for k, v."""
    model = make()
    mats = head_matrices(model)
    H, D = model.n_heads, model.head_dim
    torch.manual_seed(1)
    x = torch.randn(5, D_MODEL)
    for layer in range(model.n_layers):
        attn = model.attention_module(layer)
        if isinstance(model.hf, T.GPT2LMHeadModel):
            norm = model.hf.transformer.h[layer].ln_1
            q, k, v = attn.c_attn(norm(x)).split(H * D, dim=-1)
        else:
            norm = model.hf.model.layers[layer].input_layernorm
            q, k, v = attn.q_proj(norm(x)), attn.k_proj(norm(x)), attn.v_proj(norm(x))
            per = H // model.n_kv_heads
            k = k.view(5, -1, D).repeat_interleave(per, dim=1).flatten(1)
            v = v.view(5, -1, D).repeat_interleave(per, dim=1).flatten(1)
        xhat = _normalised(norm, x)
        for h in range(H):
            for mine, theirs in ((mats.w_q, q), (mats.w_k, k), (mats.w_v, v)):
                torch.testing.assert_close(xhat @ mine[layer][h], theirs.view(5, H, D)[:, h], atol=1e-5, rtol=1e-5)
        # W_O: head h's z slice through the output projection (bias removed)
        z = torch.randn(5, H, D)
        out = model.out_proj(layer)(z.flatten(1)) - (model.out_proj(layer).bias if model.out_proj(layer).bias
                                                     is not None else 0)
        torch.testing.assert_close(torch.einsum("bhd,hde->be", z, mats.w_o[layer]), out, atol=1e-5, rtol=1e-5)


def test_talking_heads_equal_the_dense_svd_split(llama):
    _, qk, ov = _dense(llama)
    sender, receiver = HeadRef(0, 1), HeadRef(2, 3)
    _, sigma, vh = torch.linalg.svd(ov[0][1])
    D = llama.head_dim
    for c, r in (("q", qk[2][3]), ("k", qk[2][3].T), ("v", ov[2][3])):
        expected = (vh[:D] @ r).norm(dim=1) / r.norm()
        got = talking_heads(llama, sender, receiver, c)
        assert got.shape == (D,)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        assert talking_heads(llama, sender, receiver, c, rank=3).shape == (3,)
        shares = component_shares(llama, sender, receiver, c)
        torch.testing.assert_close(float(shares.sum()), 1.0, atol=1e-5, rtol=0)
        # the shares are the components' parts of ‖W_OV^A R‖²
        energy = (sigma[:D] * expected * r.norm()) ** 2  # σ_i² ‖v_iᵀ R‖²
        torch.testing.assert_close(shares.double(), energy / (ov[0][1] @ r).norm() ** 2, atol=1e-5, rtol=1e-4)


# (b) grouped-query attention


def test_gqa_heads_of_one_group_share_keys_and_values(llama):
    mats = head_matrices(llama)
    assert llama.n_kv_heads == 2 and llama.n_heads == 4
    for layer in range(llama.n_layers):
        for w in (mats.w_k[layer], mats.w_v[layer]):
            assert w.shape == (4, D_MODEL, llama.head_dim)
            assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3])
            assert not torch.equal(w[1], w[2])
        assert not torch.equal(mats.w_q[layer][0], mats.w_q[layer][1])
        assert mats.w_o[layer].shape == (4, llama.head_dim, D_MODEL)


# (c) a planted circuit


def _planted():
    """Layer-0 head 0 writes into dims 0..3 (σ = 4, 3, 2, 1 along e_0..e_3); layer-1 head 0's W_K reads only e_2.

    Every other write lands in dims 16..31 and every other read (W_Q, W_V, other heads' W_K) in dims 4..15, so the
    planted K-edge is the model's only non-zero composition.
    """
    model = _llama(layers=2, heads=4, kv=4)
    for layer in model.hf.model.layers:
        layer.input_layernorm.weight.data.fill_(1.0)
    H, D, d = 4, model.head_dim, D_MODEL
    gen = torch.Generator().manual_seed(3)

    def rand_rows(rows, cols, where):
        w = torch.zeros(rows, cols)
        w[where] = torch.randn(len(range(*where.indices(rows))), cols, generator=gen)
        return w

    def set_head(attn, name, h, w):  # w: [d, D] for q/k/v, [D, d] for o
        lin = getattr(attn, name)
        with torch.no_grad():
            if name == "o_proj":
                lin.weight[:, h * D:(h + 1) * D] = w.T
            else:
                lin.weight[h * D:(h + 1) * D] = w.T

    reads, writes = slice(4, 16), slice(16, 32)
    for layer in range(2):
        attn = model.attention_module(layer)
        for h in range(H):
            set_head(attn, "q_proj", h, rand_rows(d, D, reads))
            set_head(attn, "v_proj", h, rand_rows(d, D, reads))
            set_head(attn, "k_proj", h, rand_rows(d, D, reads))
            set_head(attn, "o_proj", h, rand_rows(d, D, writes).T)
    a = model.attention_module(0)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    set_head(a, "v_proj", 0, basis[:, :D])  # orthonormal columns: the SVD of W_OV is e_i-aligned
    o = torch.zeros(D, d)
    o[0, 0], o[1, 1], o[2, 2], o[3, 3] = 4.0, 3.0, 2.0, 1.0
    set_head(a, "o_proj", 0, o)
    set_head(model.attention_module(1), "k_proj", 0, rand_rows(d, D, slice(2, 3)))
    return model


def test_planted_k_composition_ranks_first_and_lives_in_one_component():
    model = _planted()
    scores = composition_scores(model, progress=False)
    sender, receiver = HeadRef(0, 0), HeadRef(1, 0)
    top = scores.top_edges(3, "k")
    assert top[0][:3] == (sender, receiver, "k")
    assert top[0][3] == pytest.approx(2 / 30 ** 0.5, rel=1e-5)  # σ_2 / ‖W_OV‖, the receiver reading e_2 only
    assert top[1][3] == 0.0
    assert scores.top_edges(1)[0][:3] == (sender, receiver, "k")  # first across all channels too
    assert precision_at_k(scores, {(sender, receiver, "k")}, 1, "k") == 1.0
    assert precision_at_k(scores, {("L0H0", (1, 0), "K")}, 2) == 0.5
    per = talking_heads(model, sender, receiver, "k")
    torch.testing.assert_close(per, torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0]), atol=1e-5, rtol=0)
    shares = component_shares(model, sender, receiver, "k")
    assert shares.argmax() == 2 and shares.max() == pytest.approx(1.0, abs=1e-6)
    assert scores.top_edges(5, "k", senders=["L0H1", "L0H2"])[0][3] == 0.0
    assert [e[1] for e in scores.top_edges(2, "k", receivers=[HeadRef(1, 0)])] == [receiver, receiver]


def test_baseline_is_seeded_and_the_same_across_channels(llama):
    a = random_baseline(D_MODEL, llama.head_dim, samples=64, seed=1)
    b = random_baseline(D_MODEL, llama.head_dim, samples=64, seed=1)
    assert a == b
    for c in "qkv":
        assert 0 < a[c] < 1 and a[f"{c}_std"] > 0
    assert max(a[c] for c in "qkv") - min(a[c] for c in "qkv") < 3 * a["q_std"]
    scores = composition_scores(llama, progress=False)
    assert set(scores.baseline) >= {"q", "k", "v", "samples", "seed"}


# (d) persistence


def test_save_load_round_trip(llama, tmp_path):
    scores = composition_scores(llama, progress=False)
    folder = scores.save(tmp_path / "comp")
    back = CompositionScores.load(folder)
    for c in "qkv":
        assert torch.equal(back.channel(c), scores.channel(c))
    assert back.baseline == scores.baseline
    assert back.meta["model_name"] == scores.meta["model_name"] and back.meta["n_kv_heads"] == 2
    assert back.top_edges(5) == scores.top_edges(5)
    (folder / "composition.json").unlink()
    with pytest.raises(ResultError, match="composition.json"):
        CompositionScores.load(folder)
    scores.save(folder)
    (folder / "composition.safetensors").write_bytes(b"torn")
    with pytest.raises(ResultError, match="composition.safetensors"):
        CompositionScores.load(folder)


# (e) bad inputs


def test_bad_inputs_raise_clear_errors(llama):
    scores = composition_scores(llama, progress=False)
    with pytest.raises(ValueError, match="channel"):
        scores.top_edges(3, "x")
    with pytest.raises(ValueError, match="positive int"):
        scores.top_edges(0)
    with pytest.raises(HeadIndexError, match="out of range"):
        scores.top_edges(3, receivers=[HeadRef(2, 7)])
    with pytest.raises(HeadIndexError, match="out of range"):
        scores.score((9, 0), (1, 0), "q")
    with pytest.raises(ValueError, match="channel"):
        precision_at_k(scores, {((0, 0), (1, 0), "o")}, 3)
    with pytest.raises(ValueError, match="channel"):
        talking_heads(llama, (0, 0), (1, 0), "qk")
    with pytest.raises(HeadIndexError, match="out of range"):
        talking_heads(llama, (0, 4), (1, 0), "k")
    with pytest.raises(HeadIndexError):
        talking_heads(llama, (0, 0), (3, 0), "k")
    with pytest.raises(ValueError, match="later layer"):
        talking_heads(llama, (1, 0), (1, 2), "k")
    with pytest.raises(ValueError, match="rank"):
        talking_heads(llama, (0, 0), (1, 0), "k", rank=0)


def test_unsupported_models_are_refused():
    torch.manual_seed(0)
    bert = hl.HeadModel(T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=48)).eval())
    with pytest.raises(UnsupportedModelError, match="bert"):
        composition_scores(bert, progress=False)
    with pytest.raises(UnsupportedModelError, match="bilinear"):
        head_matrices(_linear_lm(["softmax", "linear"]))
    with pytest.raises(UnsupportedModelError, match="short_conv"):  # q, k, v mix neighbouring tokens
        head_matrices(_linear_lm(["softmax", "softmax"], short_conv=4))
