"""Mixture-of-Head layers in headlab's own model family: gates, load balance, padding, the seam, edits, the trained pair."""

from __future__ import annotations

import json
import math

import pytest
import torch

import headlab as hl
from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM
from headlab.models.linear.modeling import balance_loss
from headlab.paths import MOH_TWINS_DIR, TWINS_DIR

torch.set_num_threads(2)

H, HS, K = 6, 2, 2  # 6 heads: 2 shared, the top-2 of 4 routed


def make(*, shared=HS, active=K, heads=H, layers=2, seed=0, router_std=0.5, **kw) -> HeadlabLinearForCausalLM:
    torch.manual_seed(seed)
    cfg = HeadlabLinearConfig(vocab_size=50, hidden_size=24, num_hidden_layers=layers, num_attention_heads=heads,
                              head_dim=4, intermediate_size=32, layer_kinds="softmax", max_position_embeddings=64,
                              moh_shared_heads=shared, moh_active_heads=active, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: patterns far from uniform, routers far from ties
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.4)
            if ".router_" in name:
                p.normal_(0, router_std)
    return model


def ids_batch(batch=3, length=19, seed=1) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def layer_inputs(model, ids, attention_mask=None) -> dict[int, torch.Tensor]:
    """Each attention module's input hidden states in one forward."""
    seen = {}
    handles = [b.attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0]), with_kwargs=True)
               for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    return seen


# ------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_validation():
    cfg = HeadlabLinearConfig(num_attention_heads=4, layer_kinds="softmax")
    assert (cfg.moh_active_heads, cfg.moh_shared_heads, cfg.moh_balance_coef, cfg.moh) == (0, 0, 0.01, False)
    assert not any(".router_" in n for n, _ in HeadlabLinearForCausalLM(cfg).named_parameters())
    ok = HeadlabLinearConfig(num_attention_heads=8, layer_kinds=["softmax", "swa"], moh_shared_heads=2,
                             moh_active_heads=6)
    assert ok.moh and ok.moh_routed_heads == 6
    bad = [(dict(moh_shared_heads=2, moh_active_heads=7), "routed heads"),
           (dict(moh_shared_heads=2), "without moh_active_heads"),
           (dict(moh_active_heads=-1), "non-negative"),
           (dict(moh_active_heads=2, moh_balance_coef=-0.1), "moh_balance_coef"),
           (dict(moh_active_heads=2, layer_kinds=["softmax", "gla"]), "softmax layers only")]
    for kwargs, match in bad:
        kwargs = {"num_attention_heads": 8, "layer_kinds": "softmax", **kwargs}
        with pytest.raises(ValueError, match=match):
            HeadlabLinearConfig(**kwargs)


def test_existing_twins_configs_and_weights_still_load():
    """Saved configs have no moh_* keys: they load as plain MHA, with no router weights missing."""
    for name in ("text-softmax", "recall-based", "text-gla"):
        assert "moh_active_heads" not in json.loads((TWINS_DIR / name / "config.json").read_text())
        cfg = HeadlabLinearConfig.from_pretrained(TWINS_DIR / name)
        assert not cfg.moh and cfg.moh_shared_heads == 0
    model = hl.load("twin-text-softmax", device="cpu")  # load_folder refuses missing / unexpected weights
    with model.capturing() as cap:
        model.forward("In the beginning")
    assert all(rec.gates is None for rec in cap.records.values())


# ------------------------------------------------------------------------------------------------ gates


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_gates_shape_rescaling_and_top_k(shared):
    model = make(shared=shared)
    attn = model.model.layers[0].attn
    x = torch.randn(3, 11, 24)
    with torch.no_grad():
        r = attn.route(x)
    hr = H - shared
    assert r.gates.shape == (3, 11, H) and r.probs.shape == r.selected.shape == (3, 11, hr)
    sg, rg = r.gates[..., :shared], r.gates[..., shared:]
    assert torch.all(sg > 0), "shared heads are always on"
    assert torch.all((rg > 0).sum(-1) == K) and torch.equal(rg > 0, r.selected), "exactly K routed heads per token"
    # the chosen are the top-K of softmax(W_r x)
    assert torch.all(r.probs.masked_fill(~r.selected, 2).amin(-1) >= r.probs.masked_fill(r.selected, -1).amax(-1))
    # routed gates: renormalised over the chosen, ×K (×2α2 with shared heads); shared: softmax ×h_s ×2α1
    alpha2 = 2 * r.shares[..., 1] if shared else torch.ones(3, 11)
    assert torch.allclose(rg.sum(-1), K * alpha2, atol=1e-5)
    expected = r.probs * r.selected / (r.probs * r.selected).sum(-1, keepdim=True) * K * alpha2[..., None]
    assert torch.allclose(rg, expected, atol=1e-6)
    if shared:
        assert torch.allclose(sg.sum(-1), 2 * r.shares[..., 0] * shared, atol=1e-5)
        assert hasattr(attn, "router_s") == (shared > 1)
    else:
        assert not hasattr(attn, "router_h")


def test_routing_is_per_token_and_causal():
    """A token's gates depend on nothing after it (layer 0: on itself only)."""
    model = make()
    ids = ids_batch(1, 16)
    later = ids.clone()
    later[0, 9:] = (later[0, 9:] + 7) % 50
    a, b = layer_inputs(model, ids), layer_inputs(model, later)
    for layer in (0, 1):
        attn = model.model.layers[layer].attn
        ga, gb = attn.route(a[layer]).gates, attn.route(b[layer]).gates
        assert torch.allclose(ga[:, :9], gb[:, :9], atol=1e-6)
        assert not torch.allclose(ga[:, 9:], gb[:, 9:])


def test_off_heads_contribute_nothing_output_is_sum_of_gated_heads():
    """The layer's output = Σ_{i: g_i > 0} g_i z_i W_O^i, with z the heads' outputs (seam, before the gates) and
    W_O^i the head's slice of o_proj: heads whose gate is 0 are out, whatever they computed."""
    hf = make()
    outs = {}
    for i, block in enumerate(hf.model.layers):
        block.attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0]))
    model = hl.load(hf, device="cpu")
    ids = ids_batch()
    with model.capturing(with_z=True) as cap:
        model.forward(ids)
    D = 4
    for layer, rec in cap.records.items():
        w = hf.model.layers[layer].attn.o_proj.weight  # [C, H·D]
        manual = torch.zeros_like(outs[layer])
        for b, t in ((b, t) for b in range(ids.shape[0]) for t in range(ids.shape[1])):
            for h in torch.nonzero(rec.gates[b, t] > 0).flatten().tolist():
                manual[b, t] += rec.gates[b, t, h] * (w[:, h * D:(h + 1) * D] @ rec.z[b, t, h])
        assert (rec.gates[..., HS:] == 0).sum() > 0
        assert torch.allclose(manual, outs[layer], atol=1e-5)


def test_all_routed_heads_on_and_zero_routers():
    """K = h_r: no head is ever off and the gates are the dense closed form; with zero routers every gate is 1, so
    the MoH model equals the plain MHA model with the same weights (any K: each active head's gate is 1)."""
    model = make(active=H - HS)
    attn = model.model.layers[1].attn
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        r = attn.route(x)
        alpha = torch.softmax(attn.router_h(x), -1)
        dense_routed = 2 * alpha[..., 1:] * (H - HS) * torch.softmax(attn.router_r(x), -1)
        dense_shared = 2 * alpha[..., :1] * HS * torch.softmax(attn.router_s(x), -1)
    assert r.selected.all()
    assert torch.allclose(r.gates, torch.cat([dense_shared, dense_routed], -1), atol=1e-6)

    plain_cfg = HeadlabLinearConfig(**{**model.config.to_dict(), "moh_active_heads": 0, "moh_shared_heads": 0})
    plain = HeadlabLinearForCausalLM(plain_cfg).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".router_" in k for k in unexpected)
    ids = ids_batch()
    for active in (H - HS, 1):
        moh = make(active=active)
        moh.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            for name, p in moh.named_parameters():
                if ".router_" in name:
                    p.zero_()
            r = moh.model.layers[0].attn.route(torch.randn(2, 5, 24))
            assert torch.allclose(r.gates[r.gates > 0], torch.ones(()), atol=1e-6)
            assert torch.all((r.gates > 0).sum(-1) == HS + active)
            if active == H - HS:
                assert torch.allclose(moh(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------------------------ load balance


def test_balance_loss_hand_computed_case():
    """h_r = 2 routed heads, K = 1, routed logits = x: L_b = h_r · Σ_i P_i f_i, by hand; padding left out."""
    cfg = HeadlabLinearConfig(vocab_size=10, hidden_size=2, num_hidden_layers=1, num_attention_heads=3, head_dim=2,
                              layer_kinds="softmax", moh_shared_heads=1, moh_active_heads=1)
    attn = HeadlabLinearForCausalLM(cfg).model.layers[0].attn
    with torch.no_grad():
        attn.router_r.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 9.0]]])
    mask = torch.tensor([[True, True, True, False]])  # the last token is padding
    s = lambda a, b: math.exp(a) / (math.exp(a) + math.exp(b))  # noqa: E731
    probs = [(s(2, 0), s(0, 2)), (s(0, 1), s(1, 0)), (s(1, 0), s(0, 1))]
    P = [sum(p[i] for p in probs) / 3 for i in range(2)]
    f = [2 / 3, 1 / 3]  # heads chosen: 0, 1, 0
    expected = 2 * (P[0] * f[0] + P[1] * f[1])
    with torch.no_grad():
        r = attn.route(x, mask)
    assert r.selected[0, :3].tolist() == [[True, False], [False, True], [True, False]]
    assert abs(r.balance.item() - expected) < 1e-6
    assert abs(balance_loss(r.probs, r.selected, mask).item() - expected) < 1e-6
    with torch.no_grad():
        assert abs(attn.route(x[:, :3]).balance.item() - expected) < 1e-6
        assert abs(attn.route(x).balance.item() - expected) > 1e-3  # counting the pad would change it
    # perfectly balanced routing gives K
    assert balance_loss(torch.full((1, 2, 2), 0.5), torch.tensor([[[True, False], [False, True]]])).item() == 1.0


def test_model_loss_adds_coef_times_mean_layer_balance():
    model = make(moh_balance_coef=0.25)
    ids = ids_batch()
    out = model(input_ids=ids, labels=ids)
    inputs = layer_inputs(model, ids)
    per_layer = [model.model.layers[i].attn.route(inputs[i]).balance for i in (0, 1)]
    assert torch.allclose(out.moh_balance, torch.stack(per_layer).mean(), atol=1e-6)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce + 0.25 * out.moh_balance, atol=1e-6)
    out.loss.backward()  # the routers learn from both terms
    for name in ("router_r", "router_s", "router_h"):
        assert getattr(model.model.layers[0].attn, name).weight.grad.abs().sum() > 0
    assert model.model.layers[0].attn.moh_balance.grad_fn is None  # the module keeps no graph
    plain = make(active=0, shared=0)
    assert plain(input_ids=ids, labels=ids).moh_balance is None


def test_padding_is_ignored():
    model = make()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 50, (10,), generator=g), torch.randint(0, 50, (6,), generator=g)

    def padded(length, pad):
        ids = torch.full((2, length), pad)
        mask = torch.zeros(2, length, dtype=torch.long)
        ids[0, :10], ids[1, :6] = a, b
        mask[0, :10], mask[1, :6] = 1, 1
        return ids, mask

    with torch.no_grad():
        outs = [model(input_ids=i, attention_mask=m) for i, m in (padded(10, 0), padded(15, 7), padded(12, 49))]
        ref = outs[0].moh_balance
        for out in outs[1:]:
            assert torch.allclose(out.moh_balance, ref, atol=1e-6)
        unmasked = model(input_ids=padded(15, 7)[0]).moh_balance
    assert not torch.allclose(unmasked, ref, atol=1e-4)
    from headlab.models.linear.train import routing_stats

    ids, mask = padded(15, 7)
    stats = routing_stats(model, ids, mask)
    assert stats["tokens"] == 16 and abs(stats["balance"] - ref.item()) < 1e-5


# ------------------------------------------------------------------------------------------------ HF and headlab


def test_save_load_round_trip_and_any_attention_implementation(tmp_path):
    model = make()
    ids = ids_batch()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["moh_shared_heads"], saved["moh_active_heads"]) == (HS, K)
    again = HeadlabLinearForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(again(input_ids=ids).logits, ref)
        again.set_attn_implementation("eager")
        assert torch.allclose(again(input_ids=ids).logits, ref, atol=1e-5)
    wrapped = hl.load(tmp_path, device="cpu")  # under headlab's seam: the same model
    assert torch.allclose(wrapped.forward(ids).logits, ref, atol=1e-5)


def test_seam_records_the_layers_gates_and_patterns_work():
    hf = make()
    ids = ids_batch()
    inputs = layer_inputs(hf, ids)
    expected = {i: hf.model.layers[i].attn.route(inputs[i]).gates for i in (0, 1)}
    model = hl.load(hf, device="cpu")
    with model.capturing() as cap:
        model.forward(ids)
    for layer in (0, 1):
        assert torch.allclose(cap.records[layer].gates, expected[layer], atol=1e-6)
    run = model.run(ids)
    p = run.pattern(hl.HeadRef(1, 3))
    assert p.shape == (3, 19, 19) and torch.allclose(p.sum(-1), torch.ones(3, 19), atol=1e-5)


def test_ablate_acts_on_head_outputs_before_the_gates():
    """Zero-ablating a routed head of the last layer changes the logits only where that head is on; mean ablation
    puts the mean in before the gates (so it too is off where the gate is 0)."""
    model = hl.load(make(), device="cpu")
    ids = ids_batch()
    with model.capturing() as cap:
        base = model.forward(ids).logits
    head = HS + 1
    on = cap.records[1].gates[..., head] > 0
    assert on.any() and (~on).any()
    for edit in (hl.Ablate((1, head)), hl.Ablate((1, head), how="mean", reference=ids_batch(seed=5))):
        with hl.edit(model, [edit]):
            logits = model.forward(ids).logits
        assert torch.allclose(logits[~on], base[~on], atol=1e-6)
        assert (logits[on] - base[on]).abs().amax() > 1e-4


# ------------------------------------------------------------------------------------------------ the trained pair


def test_trained_moh_pair_beats_a_trivial_baseline_and_reproduces_its_summary():
    from headlab.models.linear.train import TwinParams, evaluate, unigram_baseline

    summary = json.loads((MOH_TWINS_DIR / "summary.json").read_text())
    moh_name, mha_name = summary["moh"], summary["mha"]
    models = summary["models"]
    baseline = unigram_baseline()
    assert abs(summary["unigram_baseline_heldout_loss"] - baseline) < 1e-6
    assert 1.0 <= summary["n_params_ratio"] < 1.02
    for name in (moh_name, mha_name):
        folder = MOH_TWINS_DIR / name
        run = json.loads((folder / "run.json").read_text())
        params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
        hf = HeadlabLinearForCausalLM.from_pretrained(folder)
        assert sum(p.numel() for p in hf.parameters()) == models[name]["n_params"]
        ev = evaluate(hf, params)
        assert abs(ev["heldout_loss"] - models[name]["heldout_loss"]) < 1e-4
        assert ev["heldout_loss"] < baseline - 0.5, (name, ev["heldout_loss"], baseline)
        if name == moh_name:
            routing = models[name]["routing"]
            assert abs(ev["routing"]["balance"] - routing["balance"]) < 1e-4
            assert abs(ev["routing"]["routing_entropy"] - routing["routing_entropy"]) < 1e-4
            for layer in routing["layers"]:
                assert layer["activation_frequency"][:2] == [1.0, 1.0]
                assert abs(sum(layer["routed_frequency"]) - 3) < 1e-4  # K of the routed heads per token
    model = hl.load(MOH_TWINS_DIR / moh_name, device="cpu")
    run = model.run("In the beginning God created the heaven and the earth.")
    assert run.pattern(hl.HeadRef(0, 0)).shape[-1] == run.pattern(hl.HeadRef(0, 0)).shape[-2]
    with model.capturing() as cap:
        model.forward("And God said, Let there be light")
    gates = cap.records[1].gates
    assert gates.shape[-1] == 8 and torch.all((gates[..., 2:] > 0).sum(-1) == 3)
