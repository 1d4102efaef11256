"""headlab.analyses.kinds: entropy, monotonicity, pattern/state rank per head across attention kinds."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

import headlab as hl
from headlab.analyses.kinds import (
    KindComparison,
    KindParams,
    compare_kinds,
    effective_rank,
    final_state,
    head_metrics,
    kind_prompts,
    pattern_identity_error,
    row_spearman,
)
from headlab.errors import PromptError, UnsupportedModelError
from headlab.heads import HeadRef
from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM
from headlab.viz.kinds import metric_by_model, pattern_grid

torch.set_num_threads(1)

TWINS = Path(__file__).resolve().parents[1] / "data" / "linear-twins"
SMALL = KindParams(n_prompts=4, seq_len=24, induction_seq_len=8, induction_batch=4, minibatch=4)
LINEAR = ("linear", "hedgehog", "based", "gla", "deltanet")


def make(kinds, *, seed=0, **kw):
    """A tiny random attention-only model (vocabulary 128 with BOS 0, like the recall twins)."""
    torch.manual_seed(seed)
    cfg = HeadlabLinearConfig(vocab_size=128, hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=2,
                              intermediate_size=0, layer_kinds=list(kinds), window=5, based_feature_dim=8,
                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger q/k than the init, so patterns are far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.4)
    return model


def load(kinds, **kw):
    return hl.load(make(kinds, **kw), device="cpu")


def naive_spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(var) if var > 0 else float("nan")


def test_row_spearman_matches_a_naive_reference_with_ties_and_masks():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 7, 7), generator=g).float()  # many ties
    b = torch.randn(3, 7, 7, generator=g)
    vis = torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(3, -1, -1)
    got = row_spearman(a, b, vis)
    for n in range(3):
        for i in range(7):
            want = naive_spearman(a[n, i, :i + 1].tolist(), b[n, i, :i + 1].tolist()) if i >= 1 else float("nan")
            if math.isnan(want):
                assert math.isnan(got[n, i])
            else:
                assert got[n, i] == pytest.approx(want, abs=1e-5), (n, i)


def test_effective_rank_of_planted_spectra():
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))) == 2
    assert effective_rank(torch.eye(6), energy=1.0) == 6
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0])), energy=0.9) == 1  # 9 / 10 holds 0.9 exactly
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0])), energy=0.95) == 2
    assert effective_rank(torch.zeros(3, 3)) == 0


def test_softmax_heads_are_monotonic_in_q_dot_k():
    model = load(["softmax", "swa"])
    sc = head_metrics(model, params=SMALL, progress=False)
    mono = sc.maps["monotonicity"]
    assert mono.shape == (2, 2)
    assert torch.all(mono > 0.999), mono
    rows = sc.items["row_monotonicity"]  # rows seeing fewer than min_keys keys are left out
    assert rows[..., : SMALL.min_keys - 1].isnan().all() and not rows[..., SMALL.min_keys - 1:].isnan().any()
    # a linear (elu+1) head is not monotonic in q·k in general: the measure can tell them apart
    lin = head_metrics(load(["linear", "linear"]), params=SMALL, progress=False)
    assert lin.maps["monotonicity"].max() < 0.99


def test_hf_softmax_model_with_kv_groups(tiny_folder):
    llama = hl.load(tiny_folder("llama"), device="cpu")  # 4 query heads reading 2 KV groups, RoPE
    sc = head_metrics(llama, [[1] + list(range(5, 28))], SMALL, progress=False)
    assert sc.maps["monotonicity"].shape == (2, 4) and torch.all(sc.maps["monotonicity"] > 0.999)
    assert sc.maps["state_rank"].isnan().all()
    assert max(pattern_identity_error(llama, [[1, 5, 6, 7, 8]]).values()) < 1e-5


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_uniform_head_has_entropy_log_n(kind):
    hf = make([kind, kind])
    with torch.no_grad():  # q = k = 0: softmax(0) and φ(0)·φ(0) = 1 both weigh every visible key equally
        hf.model.layers[0].attn.q_proj.weight.zero_()
        hf.model.layers[0].attn.k_proj.weight.zero_()
    sc = head_metrics(hl.load(hf, device="cpu"), params=SMALL, progress=False)
    t = SMALL.seq_len
    log_n = torch.arange(1, t + 1).double().log()  # row i sees i + 1 keys
    rows = sc.items["row_entropy"][:, 0]  # [N, H, T]
    assert rows[..., 0].isnan().all()  # one visible key: left out
    assert torch.allclose(rows[..., 1:].double(), log_n[1:].expand_as(rows[..., 1:]), atol=1e-5)
    assert torch.allclose(sc.maps["entropy"][0].double(), log_n[1:].mean().expand(2), atol=1e-5)
    assert torch.allclose(sc.maps["norm_entropy"][0], torch.ones(2), atol=1e-5)
    assert sc.maps["monotonicity"][0].isnan().all()  # a constant row has no ranking
    assert torch.all(sc.maps["norm_entropy"][1] < 0.999)


@pytest.mark.parametrize("kind", LINEAR)
def test_state_rank_is_bounded_and_one_for_rank_one_values(kind):
    model = load(["softmax", kind])
    sc = head_metrics(model, params=SMALL, progress=False)
    assert sc.maps["state_rank"][0].isnan().all() and sc.maps["state_dim"][0].isnan().all()
    assert torch.all(sc.maps["state_rank"][1] >= 1)
    assert torch.all(sc.maps["state_rank"][1] <= sc.maps["state_dim"][1])
    assert torch.all(sc.items["state_rank"][:, 1] <= sc.items["state_dim"][:, 1])

    hf = make(["softmax", kind])
    with torch.no_grad():  # every value vector of a head is a multiple of one vector: the state has rank 1
        v = hf.model.layers[1].attn.v_proj.weight
        v.copy_(torch.randn(v.shape[0], 1) @ torch.randn(1, v.shape[1]))
    planted = head_metrics(hl.load(hf, device="cpu"), params=SMALL, progress=False)
    assert torch.all(planted.items["state_rank"][:, 1] == 1), planted.items["state_rank"][:, 1]


@pytest.mark.parametrize("kind", ["softmax", "swa", *LINEAR])
def test_pattern_rank_fraction_lies_in_0_1(kind):
    sc = head_metrics(load([kind, kind]), params=SMALL, progress=False)
    frac = sc.items["pattern_rank_frac"]
    assert torch.all(frac > 0) and torch.all(frac <= 1)
    assert torch.allclose(sc.maps["pattern_rank"] / SMALL.seq_len, sc.maps["pattern_rank_frac"])
    assert torch.all(sc.maps["entropy"] >= 0)
    norm = sc.maps["norm_entropy"]
    assert torch.all(norm >= 0) and torch.all(norm <= 1 + 1e-6)


@pytest.mark.parametrize("kinds", [("softmax", "swa"), ("linear", "hedgehog"), ("based", "gla"), ("deltanet",)],
                         ids=lambda k: "+".join(k))
def test_shares_equal_the_induction_scan_for_normalised_kinds_and_lie_in_0_1(kinds):
    sc = head_metrics(load(kinds), params=SMALL, progress=False)
    for layer, kind in enumerate(kinds):
        for key in ("induction", "prev_token"):
            share, top1 = sc.maps[f"{key}_share"][layer], sc.maps[f"{key}_top1"][layer]
            assert torch.all(share >= 0) and torch.all(share <= 1)
            assert torch.all(top1 >= 0) and torch.all(top1 <= 1)
            if kind in ("softmax", "swa", "linear", "hedgehog", "based"):
                assert torch.allclose(share, sc.maps[key][layer], atol=1e-4), (kind, key)
                assert torch.allclose(sc.maps["row_mass"][layer], torch.ones(2), atol=1e-4)


def test_padding_changes_nothing_for_the_short_prompt():
    model = load(["gla", "deltanet"])
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, 128, (20,), generator=g).tolist(), torch.randint(1, 128, (12,), generator=g).tolist()
    both = head_metrics(model, [[0] + long, [0] + short], SMALL, progress=False)
    alone = head_metrics(model, [[0] + short], SMALL, progress=False)
    for key in ("entropy", "monotonicity", "pattern_rank", "state_rank"):
        assert torch.allclose(both.items[key][1], alone.items[key][0], atol=1e-4, equal_nan=True), key
    # the state itself: GLA keeps decaying over padded positions, so the state is read at the last real token
    padded = model.run([[0] + long, [0] + short]).records
    single = model.run([[0] + short]).records
    for layer in (0, 1):
        want = final_state(single[layer], 0, 13)
        assert torch.allclose(final_state(padded[layer], 1, 13), want, atol=1e-5 * want.abs().max())


def test_compare_kinds_on_tiny_models_table_summary_figures_and_round_trip(tmp_path):
    models = {"softmax": load(["softmax", "softmax"]), "gla": load(["gla", "gla"]),
              "hybrid": load(["swa", "deltanet"]), "hedgehog": load(["hedgehog", "based"])}
    start = time.perf_counter()
    comp = compare_kinds(models, SMALL, progress=False)
    assert time.perf_counter() - start < 20
    table = comp.table()
    assert len(table) == 4 * 2 * 2
    assert {r["kind"] for r in table} == {"softmax", "gla", "swa", "deltanet", "hedgehog", "based"}
    summary = comp.summary()
    assert [(r["model"], r["kind"]) for r in summary] == [
        ("softmax", "all"), ("gla", "all"), ("hybrid", "all"), ("hybrid", "swa"), ("hybrid", "deltanet"),
        ("hedgehog", "all"), ("hedgehog", "hedgehog"), ("hedgehog", "based")]
    md = comp.to_markdown()
    assert md.count("\n") == len(summary) + 1 and "| hybrid | deltanet |" in md
    assert comp.to_markdown(["entropy"]).splitlines()[0] == "| model | kind | heads | entropy |"
    assert comp.to_markdown(["state_rank"], per_head=True).count("–") == 2 * 2 + 2  # softmax model + swa layer
    # every model saw the same prompts
    tokens = [sc.items["tokens"] for sc in comp.scores.values()]
    assert all(torch.equal(tokens[0], t) for t in tokens[1:])

    fig = metric_by_model(table, "norm_entropy")
    assert {tr.name for tr in fig.data} == {"softmax", "gla", "swa", "deltanet", "hedgehog", "based"}
    assert len(comp.figure("state_rank").data) == 4  # softmax and swa have no state: no trace
    with pytest.raises(KeyError, match="no metric"):
        metric_by_model(table, "nope")

    comp.save(tmp_path / "cmp")
    again = KindComparison.load(tmp_path / "cmp")
    assert again.models == comp.models and again.layer_kinds == comp.layer_kinds and again.params == comp.params
    for key, sc in comp.scores.items():
        other = again.scores[key]
        assert set(other.maps) == set(sc.maps) and set(other.items) == set(sc.items)
        for name in sc.maps:
            assert torch.allclose(other.maps[name], sc.maps[name], equal_nan=True), (key, name)
        for name in sc.items:
            assert other.items[name].dtype == sc.items[name].dtype, (key, name)
            assert torch.allclose(other.items[name].double(), sc.items[name].double(), equal_nan=True), (key, name)
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    assert all(same(a, b) for ra, rb in zip(again.table(), table) for a, b in zip(ra.values(), rb.values()))


def test_pattern_grid_uses_a_signed_scale_for_signed_patterns():
    from headlab.analyses.kinds import head_patterns

    models = {"softmax": load(["softmax"]), "deltanet": load(["deltanet"])}
    prompt = kind_prompts(SMALL)[:1]
    pats = head_patterns(models, prompt, {k: HeadRef(0, 1) for k in models})
    assert pats["softmax"].shape == (SMALL.seq_len, SMALL.seq_len)
    assert (pats["deltanet"] < 0).any()
    fig = pattern_grid(pats, tokens=[str(i) for i in prompt[0].tolist()])
    scales = {tr.colorscale[0][1] for tr in fig.data}
    assert len(fig.data) == 2 and fig.data[1].zmin == -fig.data[1].zmax and fig.data[0].zmin == 0
    assert len(scales) == 2
    errs = pattern_identity_error(models["deltanet"], prompt)
    assert max(errs.values()) < 1e-5


def test_clear_errors():
    model = load(["softmax"])
    with pytest.raises(ValueError, match="non-empty dict"):
        compare_kinds({}, SMALL)
    with pytest.raises(PromptError, match="'long'.*seq_len=100.*context of 64"):
        compare_kinds({"long": model}, KindParams(seq_len=100))
    with pytest.raises(PromptError, match="induction_seq_len=40"):
        head_metrics(model, params=KindParams(seq_len=24, induction_seq_len=40))
    with pytest.raises(PromptError, match="longer than .*context of 64"):
        head_metrics(model, [list(range(1, 100))], SMALL)
    with pytest.raises(ValueError, match="source"):
        KindParams(source="wiki")
    with pytest.raises(ValueError, match="energy"):
        KindParams(energy=0.0)
    with pytest.raises(UnsupportedModelError, match="expected a HeadModel"):
        head_metrics(make(["softmax"]), params=SMALL)


def test_an_encoder_is_refused(tiny_folder):
    bert = hl.load(tiny_folder("bert"), device="cpu")
    with pytest.raises(UnsupportedModelError, match="'enc'.*not a causal LM"):
        compare_kinds({"enc": bert}, SMALL, prompts=[[1, 2, 3, 4]])


def test_trained_recall_softmax_twin_has_induction_heads_the_elu_twin_lacks():
    folder = TWINS / "recall-softmax"
    if not (folder / "run.json").is_file():
        pytest.skip(f"{folder} not trained yet (headlab train twins --tasks recall)")
    params = KindParams(n_prompts=8)
    sc = head_metrics(hl.load(folder, device="cpu"), params=params, progress=False)
    assert sc.maps["induction"][1].max() > 0.5  # the second layer holds the induction heads (~0.8)
    assert sc.maps["prev_token"][0].max() > 0.3  # fed by a previous-token head in the first (~0.6)
    assert torch.all(sc.maps["monotonicity"] > 0.999)
    linear = TWINS / "recall-linear"
    if (linear / "run.json").is_file():  # elu+1 attention never forms one (best ~0.08)
        lin = head_metrics(hl.load(linear, device="cpu"), params=params, progress=False)
        assert sc.maps["induction"].max() > 2 * lin.maps["induction"].max()
        assert lin.maps["monotonicity"].max() < 0.9
