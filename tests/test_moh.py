"""Mixture-of-head routing as an edit: gates, routers, router training, conversion sweep, routing analytics (tiny
models, the planted router, and the CLI on a tiny twin)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import headlab as hl
from conftest import VOCAB
from headlab.capture import Gate, LayerOps
from headlab.heads import HeadRef
from headlab.moh import (Conversion, ConvertParams, LearnedRouter, MoHRouting, RouterParams, conversion_sweep,
                         load_router, query_norm_scores, trace, train_router)
from headlab.moh.planted import planted_router_model
from headlab.moh.routing import TOKEN_TYPES, token_flags
from headlab.paths import TWINS_DIR


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_folder):
    return hl.load(tiny_folder(request.param), device="cpu")


@pytest.fixture(scope="module")
def twin():
    return hl.load(str(TWINS_DIR / "text-softmax"))


def _ids(seed, shape=(3, 12)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(ids).logits


def test_every_routed_head_on_is_bit_identical(tiny):
    ids = _ids(0)
    base = _logits(tiny, ids)
    with hl.edit(tiny, hl.MoH(active=1.0)):
        assert torch.equal(_logits(tiny, ids), base)
    with hl.edit(tiny, hl.MoH(active=tiny.n_heads - hl.MoH(active=1.0).n_shared(tiny))):  # a count: all of them
        assert torch.equal(_logits(tiny, ids), base)
    assert torch.equal(_logits(tiny, ids), base)  # and restored after


def test_default_shared_heads_are_whole_kv_groups(tiny):
    moh = hl.MoH(active=1)
    per_group = tiny.n_heads // tiny.n_kv_heads
    assert moh.n_shared(tiny) % per_group == 0
    assert moh.n_shared(tiny) == (tiny.n_kv_heads // 2) * per_group


def test_gates_keep_shared_and_exactly_k_routed_heads_by_query_norm(tiny):
    ids = _ids(1)
    moh = hl.MoH(active=1, layers=(1,))
    shared = moh.n_shared(tiny)
    base = tiny.run(ids, layers=[1], with_z=True)
    with hl.edit(tiny, moh):
        run = tiny.run(ids, layers=[1], with_z=True)
    rec, ref = run.records[1], base.records[1]
    g = rec.gates  # [B, T, H]
    assert g.shape == (3, 12, tiny.n_heads)
    assert torch.all(g[..., :shared] == 1)
    assert torch.all(g[..., shared:].sum(-1) == 1)
    # the routed head on is the one with the largest query norm among the routed heads
    norms = ref.q[:, shared:].norm(dim=-1).transpose(1, 2)  # [B, T, h_r]
    assert torch.equal(g[..., shared:].argmax(-1), norms.argmax(-1))
    # on: the head's own output, unchanged; off: zero (layer 0 is not routed, so layer 1's inputs are the same)
    on = g.bool()
    assert torch.equal(rec.z[on], ref.z[on])
    assert torch.all(rec.z[~on] == 0)


def test_query_norm_scores_are_standardised():
    q = torch.randn(2, 6, 5, 8)
    s = query_norm_scores(q, [2, 3, 4, 5])
    assert s.shape == (2, 5, 4)
    torch.testing.assert_close(s.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.std(-1, unbiased=False), torch.ones(2, 5), atol=1e-4, rtol=0)
    expected = q[:, 2:].norm(dim=-1).transpose(1, 2)
    assert torch.equal(s.argsort(-1), expected.argsort(-1))


def test_moh_bad_inputs_are_named(tiny):
    with pytest.raises(hl.EditError, match="fraction"):
        hl.MoH(active=1.5)
    with pytest.raises(hl.EditError, match="at least one"):
        hl.MoH(active=0)
    with pytest.raises(hl.EditError, match="fraction"):
        hl.MoH(active="half")
    with pytest.raises(hl.EditError, match="no routed head"):
        with hl.edit(tiny, hl.MoH(active=1, shared=tiny.n_heads)):
            pass
    with pytest.raises(hl.EditError, match="more routed heads"):
        with hl.edit(tiny, hl.MoH(active=tiny.n_heads)):
            pass
    with pytest.raises(hl.HeadIndexError):
        with hl.edit(tiny, hl.MoH(active=1, layers=(7,))):
            pass
    router = LearnedRouter([0], 2, 64)
    with pytest.raises(hl.EditError, match="not layer 1"):
        with hl.edit(tiny, hl.MoH(active=1, router=router, layers=(1,))):
            tiny.forward(_ids(0))
    with pytest.raises(hl.EditError, match="not a router"):
        hl.MoH(active=1, router=object())


def test_moh_refuses_linear_layers():
    model = hl.load(str(TWINS_DIR / "recall-linear"))
    with pytest.raises(hl.EditError, match="softmax heads"):
        with hl.edit(model, hl.MoH(active=1)):
            pass


def test_gate_edit_with_wrong_shape_is_named(tiny):
    class Bad:
        def layer_ops(self, model):
            return {0: LayerOps(gates=(Gate(lambda r: torch.ones(3), name="bad gate"),))}

    with pytest.raises(hl.EditError, match="bad gate on layer 0 gave gates of shape"):
        with hl.edit(tiny, Bad()):
            tiny.forward(_ids(0))


def test_moh_composes_with_other_edits_and_restores_on_error(tiny):
    ids = _ids(2)
    base = _logits(tiny, ids)
    with hl.edit(tiny, hl.MoH(active=1)):
        routed = _logits(tiny, ids)
        with hl.edit(tiny, hl.Ablate((0, 0))):
            both = _logits(tiny, ids)
    with hl.edit(tiny, [hl.MoH(active=1), hl.Ablate((0, 0))]):
        assert torch.equal(_logits(tiny, ids), both)
    assert not torch.equal(routed, base)
    with pytest.raises(RuntimeError, match="boom"):
        with hl.edit(tiny, hl.MoH(active=1)):
            raise RuntimeError("boom")
    assert torch.equal(_logits(tiny, ids), base)


def test_learned_router_starts_as_the_query_norm_router_and_gets_gradient(tiny):
    ids = _ids(3)
    moh = hl.MoH(active=1)
    router = LearnedRouter(range(tiny.n_layers), tiny.n_heads - moh.n_shared(tiny), tiny.hf.config.hidden_size)
    with hl.edit(tiny, moh):
        free = _logits(tiny, ids)
    with hl.edit(tiny, dataclasses.replace(moh, router=router)):
        assert torch.equal(_logits(tiny, ids), free)
    params = list(tiny.hf.parameters())
    with hl.edit(tiny, dataclasses.replace(moh, router=router, straight_through=True)):
        loss = tiny.loss(ids, grad=True)
    grads = torch.autograd.grad(loss, [router.weight, router.bias])
    assert float(grads[0].abs().sum()) > 0 and float(grads[1].abs().sum()) > 0
    assert all(p.grad is None for p in params)


def test_train_router_resumes_bit_for_bit_and_leaves_the_model_alone(twin, tmp_path):
    params = RouterParams(steps=4, batch=2, seq_len=32, checkpoint_every=2, text=str(TWINS_DIR.parent / "text" /
                                                                                       "kjv-genesis-1-15.txt"))
    moh = hl.MoH(active=1)
    before = {k: v.clone() for k, v in twin.hf.state_dict().items()}
    flags = [p.requires_grad for p in twin.hf.parameters()]
    full, state = train_router(twin, moh, params, out=tmp_path / "a", progress=False)
    half, _ = train_router(twin, moh, dataclasses.replace(params, steps=2), out=tmp_path / "b", progress=False)
    # "b" resumed with the full settings must refuse (other steps), so resume from a copy of the 2-step checkpoint
    with pytest.raises(hl.HeadlabError, match="other settings"):
        train_router(twin, moh, params, out=tmp_path / "b", progress=False)
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "c")
    state_c = json.loads((tmp_path / "c" / "router.json").read_text())
    assert state_c["step"] == 4
    # an interrupted run: the checkpoint at step 2 of the full run
    part = tmp_path / "d"
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Stop
        return orig(*a, **k)

    orig = torch.optim.AdamW.step
    torch.optim.AdamW.step = boom
    try:
        with pytest.raises(Stop):
            train_router(twin, moh, params, out=part, progress=False)
    finally:
        torch.optim.AdamW.step = orig
    resumed, state_d = train_router(twin, moh, params, out=part, progress=False)
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)
    assert [c[1:] for c in state_d["curve"]] == [c[1:] for c in state["curve"]]
    loaded, _ = load_router(tmp_path / "a")
    assert torch.equal(loaded.weight, full.weight)
    assert all(torch.equal(v, before[k]) for k, v in twin.hf.state_dict().items())
    assert [p.requires_grad for p in twin.hf.parameters()] == flags
    assert not torch.equal(half.weight, torch.zeros_like(half.weight))


def test_planted_router_is_recovered_by_the_analytics(tmp_path):
    model, moh, planted = planted_router_model()
    texts = ["In the beginning, God created the heaven and the earth; 1 2 3 and 45 days!",
             "Verse 12: and he said, 'Let there be light.' 7 + 8 = 15? Yes: 99 of 100."]
    routing = trace(model, moh, texts)
    flags, gates = routing.flags, routing.gates
    punct, digits = TOKEN_TYPES.index("punctuation"), TOKEN_TYPES.index("number")
    assert bool(gates[flags[:, punct], 0, planted["punctuation"]].all())
    assert bool(gates[flags[:, digits], 0, planted["number"]].all())
    by_type = routing.by_type(top=1, min_tokens=3)
    assert by_type["punctuation"]["top"][0][0] == f"L0H{planted['punctuation']}"
    assert by_type["number"]["top"][0][0] == f"L0H{planted['number']}"
    # persistence
    routing.save(tmp_path / "r")
    back = MoHRouting.load(tmp_path / "r")
    assert torch.equal(back.gates, routing.gates)
    assert back.load_balance() == routing.load_balance()
    assert back.by_type() == routing.by_type()


def test_load_balance_entropy_and_gqa_costs_on_hand_made_gates():
    # 4 tokens, 1 layer, 4 heads (2 KV groups of 2); heads 0 shared, routed 1..3, k = 1
    gates = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.uint8)[:, None]
    scores = torch.log(torch.tensor([[.7, .2, .1], [.2, .7, .1], [.1, .2, .7], [.1, .2, .7]]))[:, None]
    flags = torch.zeros(4, len(TOKEN_TYPES), dtype=torch.uint8)
    from headlab.moh.routing import _maps
    from headlab.results import HeadScores

    maps = _maps(gates.bool(), scores, flags.bool(), [0], 1)
    r = MoHRouting(HeadScores("moh_routing", "hand", maps, "frequency",
                              params={"shared": 1, "k": 1, "layers": [0], "n_kv_heads": 2},
                              items={"gates": gates, "router_scores": scores, "flags": flags,
                                     "token_ids": torch.arange(4), "positions": torch.arange(4),
                                     "sequence": torch.zeros(4, dtype=torch.long)}))
    f = torch.tensor([.25, .25, .5])
    p = torch.tensor([[.7, .2, .1], [.2, .7, .1], [.1, .2, .7], [.1, .2, .7]]).mean(0)
    lb = r.load_balance()
    assert lb["L_b"][0] == pytest.approx(float((p * f).sum()), abs=1e-6)
    assert lb["balanced_L_b"] == pytest.approx(1 / 3)
    assert lb["cv"][0] == pytest.approx(float(f.std(unbiased=False) / f.mean()), abs=1e-6)
    ent = r.entropy()
    h = -(torch.tensor([.7, .2, .1]) * torch.tensor([.7, .2, .1]).log()).sum()
    assert ent["token_entropy"][0] == pytest.approx(float(h), abs=1e-5)
    costs = r.costs()
    assert costs["query_heads_on"] == pytest.approx(0.5)
    # group 0 = heads 0-1 (head 0 shared: always read); group 1 = heads 2-3: read for tokens 1, 2, 3
    assert costs["kv_groups_read"] == pytest.approx(7 / 8)
    m = torch.zeros(1, 4)
    m[0, 1:] = torch.tensor([1.0, 2.0, 3.0])
    assert r.relate({"x": m})["x"] == pytest.approx(float(__import__("headlab").analyses.metrics.spearman(
        f, torch.tensor([1.0, 2.0, 3.0]))))


def test_token_flags():
    flags = token_flags(["<s>", " the", " fox", ",", " 12", " ", " the"], [0, 1, 2, 3, 4, 5, 1])
    names = {name: flags[:, j].tolist() for j, name in enumerate(TOKEN_TYPES)}
    assert names["first"] == [True] + [False] * 6
    assert names["punctuation"][3] and not names["punctuation"][1]
    assert names["number"][4] and names["whitespace"][5]
    assert names["function_word"][1] and names["content_word"][2]
    assert names["repeated"] == [False] * 6 + [True]


def test_conversion_sweep_resumes_and_compares_with_pruning(twin, tmp_path, monkeypatch):
    params = ConvertParams(actives=(0.5, 1.0), rankers=("random",), windows=2, ctx=64, tasks=(),
                           train=RouterParams(steps=2, batch=2, seq_len=32))
    result = conversion_sweep(twin, params, tmp_path / "sweep", progress=False)
    methods = {(r["method"], r["k"]) for r in result.rows}
    assert methods == {("original", 2), ("moh:querynorm", 1), ("moh:querynorm", 2), ("moh:trained", 1),
                       ("moh:trained", 2), ("prune:random", 1), ("prune:random", 2)}
    by = {(r["method"], r["k"]): r for r in result.rows}
    base = by[("original", 2)]["metrics"]["ppl"]
    for m in ("moh:querynorm", "moh:trained", "prune:random"):
        assert by[(m, 2)]["metrics"]["ppl"] == base  # all heads on: the original model, exactly
    assert by[("moh:querynorm", 1)]["heads_on"] == pytest.approx(0.75)
    assert by[("prune:random", 1)]["n_removed"] == 2 * twin.n_layers // 2 * 1
    # a rerun measures nothing again
    import headlab.moh.convert as convert

    monkeypatch.setattr(convert, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured")))
    again = conversion_sweep(twin, params, tmp_path / "sweep", progress=False)
    assert again.rows == result.rows
    loaded = Conversion.load(tmp_path / "sweep")
    assert loaded.table()["original"][2] == base
    assert "moh:trained" in loaded.markdown()
    with pytest.raises(hl.HeadlabError, match="other settings"):
        conversion_sweep(twin, dataclasses.replace(params, windows=3), tmp_path / "sweep", progress=False)
    monkeypatch.undo()  # another router into the same folder: only its rows are measured
    more = conversion_sweep(twin, dataclasses.replace(params, routers=("querynorm", "querynorm-group")),
                            tmp_path / "sweep", progress=False)
    group = {r["k"]: r for r in more.rows if r["method"] == "moh:querynorm-group"}
    assert set(group) == {1, 2} and group[2]["metrics"]["ppl"] == base
    assert len(Conversion.load(tmp_path / "sweep").rows) == len(result.rows) + 2


def test_cli_moh_train_and_analyse(tmp_path, capsys):
    from headlab.cli import main

    folder = str(TWINS_DIR / "text-softmax")
    text = str(TWINS_DIR.parent / "text" / "kjv-genesis-1-15.txt")
    assert main(["moh", "train", "--model", folder, "--active", "1", "--out", str(tmp_path / "r"), "--steps", "2",
                 "--seq-len", "32", "--batch", "2", "--train-text", text]) == 0
    assert "router for k=1" in capsys.readouterr().out
    assert main(["moh", "analyse", "--model", folder, "--active", "1", "--router", str(tmp_path / "r"), "--out",
                 str(tmp_path / "a"), "--windows", "2", "--ctx", "32", "--relate", "induction"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["k"] == 1 and "induction" in summary["relate"]
    assert (tmp_path / "a" / "tokens.html").is_file()
    assert MoHRouting.load(tmp_path / "a" / "routing").k == 1
    assert main(["moh", "analyse", "--model", folder, "--router", str(tmp_path / "r"), "--out",
                 str(tmp_path / "b")]) == 2
    assert "--router needs --active" in capsys.readouterr().err
    assert main(["moh", "convert", "--model", folder, "--out", str(tmp_path / "c"), "--rankers", "nope"]) == 2


def test_head_outputs_for_padding_do_not_matter(tiny):
    ids = _ids(4, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with hl.edit(tiny, hl.MoH(active=1)):
        padded = tiny.forward(hl.Batch(ids, mask)).logits
        alone = tiny.forward(ids[1:, :7]).logits
    torch.testing.assert_close(padded[1, :7], alone[0], atol=1e-5, rtol=1e-5)


def test_headref_of_routing_lift_names_real_heads(tiny):
    routing = trace(tiny, hl.MoH(active=1), [_ids(5, (1, 16))[0]])
    for entry in routing.by_type(min_tokens=1).values():
        for name, _, _ in entry["top"]:
            ref = hl.as_heads([name])[0]
            assert isinstance(ref, HeadRef) and ref.head >= hl.MoH(active=1).n_shared(tiny)


def test_routed_compute_equals_dense_and_skips_unrouted_rows(tiny, monkeypatch):
    ids = _ids(6, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0
    batch = hl.Batch(ids, mask)
    import headlab_kernels.routed_attention as ra

    calls = []
    real = ra.routed_attention
    monkeypatch.setattr(ra, "routed_attention", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    for active in (1, 1.0):
        with hl.edit(tiny, hl.MoH(active=active)):
            dense = tiny.forward(batch).logits
        with hl.edit(tiny, hl.MoH(active=active, compute="routed")):
            routed = tiny.forward(batch).logits
        torch.testing.assert_close(routed[0], dense[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routed[1, :10], dense[1, :10], atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 * tiny.n_layers  # every layer went through the routed kernel
    assert float((calls[0] == 0).float().mean()) > 0  # with rows off
    with pytest.raises(hl.EditError, match="compute"):
        hl.MoH(active=1, compute="sparse")


def test_group_routing_turns_whole_kv_groups_off(tiny_folder):
    model = hl.load(tiny_folder("llama"), device="cpu")  # 4 heads in 2 KV groups
    ids = _ids(7)
    with pytest.raises(hl.EditError, match="multiples of 2"):
        with hl.edit(model, hl.MoH(active=1, shared=1, unit="group")):
            pass
    routing = trace(model, hl.MoH(active=2, shared=0, unit="group"), [ids[0]])
    g = routing.gates  # [N, L, 4]
    assert torch.all(g[..., 0] == g[..., 1]) and torch.all(g[..., 2] == g[..., 3])
    assert torch.all(g.sum(-1) == 2)
    assert routing.costs()["kv_groups_read"] == pytest.approx(0.5)
    with pytest.raises(hl.EditError, match="unit"):
        hl.MoH(active=1, unit="token")


def test_trace_reads_a_models_own_moh_layers_and_the_twin_command_skips_trained_models(capsys):
    from headlab.cli import main
    from headlab.paths import MOH_TWINS_DIR

    model = hl.load(str(MOH_TWINS_DIR / "text-moh"))
    routing = trace(model, None, ["In the beginning God created the heaven and the earth."])
    cfg = model.hf.config
    g = routing.gates
    assert routing.shared == cfg.moh_shared_heads and routing.k == cfg.moh_active_heads
    assert torch.all(g[..., :cfg.moh_shared_heads]) and torch.all(g[..., cfg.moh_shared_heads:].sum(-1) == routing.k)
    assert routing.router_scores is None and math.isnan(routing.load_balance()["mean_L_b"])  # no router probabilities
    with pytest.raises(hl.HeadlabError, match="no MoH layers"):
        trace(hl.load(str(TWINS_DIR / "text-softmax")), None, ["a b c"])
    assert main(["moh", "twin"]) == 0  # both trained and committed: nothing is retrained, the summary is printed
    out = capsys.readouterr().out
    assert '"moh": "text-moh"' in out and '"mha": "text-mha"' in out


def test_random_router_is_a_seeded_null(tiny):
    from headlab.moh import RandomRouter

    ids = _ids(8)
    one = trace(tiny, hl.MoH(active=1, router=RandomRouter(seed=3)), [ids[0]])
    two = trace(tiny, hl.MoH(active=1, router=RandomRouter(seed=3)), [ids[0]])
    other = trace(tiny, hl.MoH(active=1, router=RandomRouter(seed=4)), [ids[0]])
    assert torch.equal(one.gates, two.gates) and not torch.equal(one.gates, other.gates)
    assert torch.all(one.gates[..., one.shared:].sum(-1) == 1)
