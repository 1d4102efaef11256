"""Rankers: AtP against exhaustive ablation, the pruning order, saved scores, spearman, fractions."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.errors import HeadlabError
from headlab.prune import (
    InductionTask,
    RankParams,
    ablation_scores,
    atp_scores,
    compare_atp,
    n_to_remove,
    parse_fractions,
    prune_order,
    rank,
    spearman,
)
from headlab.results import HeadScores


@pytest.fixture(scope="module")
def model() -> hl.HeadModel:
    """A tiny GQA Llama with weights large enough (std 0.05) that heads matter and effects are non-linear."""
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, bos_token_id=1,
                        initializer_range=0.05)
    torch.manual_seed(0)
    return hl.load(T.LlamaForCausalLM(cfg).eval())


CALIB = InductionTask(seq_len=12, batch=4, seed=2)


def test_atp_is_the_derivative_of_zero_ablation(model):
    """-∂L/∂a (AtP) against a central difference of Scale(head, 1 ± ε)."""
    atp = atp_scores(model, CALIB)
    clean = float(CALIB.loss(model))
    assert atp["clean_loss"] == pytest.approx(clean, abs=1e-6)
    eps = 1e-2
    for ref in [hl.HeadRef(0, 1), hl.HeadRef(2, 3)]:
        losses = []
        for factor in (1 - eps, 1 + eps):
            with hl.edit(model, hl.Scale(ref, factor=factor)):
                losses.append(float(CALIB.loss(model)))
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert atp["estimate"][ref.layer, ref.head] == pytest.approx(fd, rel=0.01, abs=1e-4)


def test_atp_tracks_exhaustive_ablation(model):
    exhaustive = ablation_scores(model, CALIB, progress=False)
    for ref in [hl.HeadRef(1, 2)]:
        with hl.edit(model, hl.Ablate(ref)):
            assert exhaustive["delta"][1, 2] == pytest.approx(float(CALIB.loss(model)) - exhaustive["clean_loss"])
    atp = atp_scores(model, CALIB)
    rho = spearman(atp["estimate"], exhaustive["delta"])
    assert rho > 0.8, rho  # 0.97 here; it falls to ~0.5 at init std 0.2, where effects are far from linear
    assert float(CALIB.loss(model)) == pytest.approx(exhaustive["clean_loss"])  # no edit outlived its scope


def test_rankings_and_comparison(model):
    params = RankParams(calib="task:induction", seed=3, scan_seq_len=8, scan_batch=2)
    cache: dict = {"progress": False}
    got = {name: rank(model, name, params, cache=cache) for name in ("induction", "sink", "ablation", "atp", "random")}
    for name, r in got.items():
        assert r.scores.shape == (3, 4) and r.primary == "score"
        assert r.params["ranker"] == name and "lowest" in r.meta["direction"]
    assert torch.equal(got["random"].scores.flatten().sort().values, torch.arange(12.0))
    assert torch.equal(rank(model, "random", params).scores, got["random"].scores)  # seeded
    c = compare_atp(got["atp"], got["ablation"])
    assert c["heads"] == 12 and -1 <= c["spearman"] <= 1 and c["speedup"] > 0


def test_partial_ablation_and_comparison(model):
    part = ablation_scores(model, CALIB, heads=model.heads(layers=[1]), progress=False)["delta"]
    assert part[1].isfinite().all() and part[0].isnan().all()
    full = ablation_scores(model, CALIB, progress=False)["delta"]
    assert torch.allclose(part[1], full[1])


def test_prune_order_lowest_first():
    scores = torch.tensor([[0.5, float("nan"), -1.0], [0.5, 0.2, 3.0]])
    order = [str(h) for h in prune_order(scores)]
    assert order == ["L0H2", "L1H1", "L0H0", "L1H0", "L1H2", "L0H1"]  # ties by (layer, head), NaN last


def test_saved_scores_ranker(model, tmp_path):
    maps = {"retrieval": torch.arange(12.0).view(3, 4), "other": torch.zeros(3, 4)}
    HeadScores(analysis="retrieval", model="x", maps=maps, primary="other").save(tmp_path / "ret")
    r = rank(model, f"scores:{tmp_path / 'ret'}:retrieval")
    assert torch.equal(r.scores, maps["retrieval"])
    assert torch.equal(rank(model, f"scores:{tmp_path / 'ret'}").scores, maps["other"])  # primary by default
    with pytest.raises(HeadlabError, match="no map"):
        rank(model, f"scores:{tmp_path / 'ret'}:nope")
    HeadScores(analysis="r", model="x", maps={"s": torch.zeros(2, 2)}, primary="s").save(tmp_path / "bad")
    with pytest.raises(HeadlabError, match="heads"):
        rank(model, f"scores:{tmp_path / 'bad'}")
    with pytest.raises(HeadlabError, match="scores:PATH:retrieval"):
        rank(model, "retrieval")


def test_spearman_fractions_counts():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1)
    # ties take average ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) → ρ = 0.866
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(math.sqrt(3) / 2)
    assert parse_fractions("0,0.05,...,0.5") == tuple(round(0.05 * k, 10) for k in range(11))
    assert parse_fractions("0, 0.25,0.5") == (0.0, 0.25, 0.5)
    with pytest.raises(HeadlabError):
        parse_fractions("0,...,0.5")
    assert n_to_remove(0.25, 270) == 68 and n_to_remove(0.0, 270) == 0 and n_to_remove(1.0, 8) == 8
    with pytest.raises(HeadlabError):
        n_to_remove(1.5, 8)
