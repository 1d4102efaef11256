"""The repeated-tokens scan, its result object, figures and the `headlab scan induction` command."""

from __future__ import annotations

import json

import pytest
import torch

import headlab as hl
from headlab.analyses.induction import InductionParams, copy_losses, induction_scan, repeated_tokens
from headlab.cli import main
from headlab.results import HeadScores
from headlab.viz import token_ticks


@pytest.fixture(scope="module")
def gpt2(tiny_folder):
    return hl.load(tiny_folder("gpt2"), device="cpu")


def test_repeated_tokens_layout(gpt2):
    toks = repeated_tokens(gpt2, seq_len=7, batch=3, seed=1)
    assert toks.shape == (3, 15)
    assert torch.equal(toks[:, 1:8], toks[:, 8:])
    assert (toks[:, 0] == gpt2.bos_id).all() and not (toks[:, 1:] == gpt2.bos_id).any()
    assert torch.equal(toks, repeated_tokens(gpt2, seq_len=7, batch=3, seed=1))
    with pytest.raises(hl.PromptError, match="context of 64"):
        repeated_tokens(gpt2, seq_len=40, batch=1)


def test_scan_scores_equal_the_definitions_on_full_patterns(gpt2):
    params = InductionParams(seq_len=9, batch=4, seed=3, minibatch=3)
    scores = induction_scan(gpt2, params, progress=False)
    tokens = scores.items["tokens"]
    run = gpt2.run(tokens)
    n = 9
    for layer in range(gpt2.n_layers):
        p = run.patterns(layer)  # [B, H, T, T]
        prev = torch.stack([p[:, :, i, i - 1] for i in range(2, 2 * n + 1)], -1).mean((0, -1))
        ind = torch.stack([p[:, :, i, i - n + 1] for i in range(n + 1, 2 * n + 1)], -1).mean((0, -1))
        first = p[:, :, 1:, 0].mean((0, -1))
        assert torch.allclose(scores.maps["prev_token"][layer], prev, atol=1e-6)
        assert torch.allclose(scores.maps["induction"][layer], ind, atol=1e-6)
        assert torch.allclose(scores.maps["first_token"][layer], first, atol=1e-6)
    assert scores.items["induction"].shape == (4, 2, 4)
    losses = gpt2.token_losses(tokens)
    assert torch.allclose(scores.items["token_losses"], losses, atol=1e-5)
    assert scores.meta["loss_first_copy"] == pytest.approx(copy_losses(losses, n)["loss_first_copy"], abs=1e-5)


def test_planted_uniform_heads_have_the_known_first_token_score(tiny_folder):
    """Zero queries make every layer-0 head uniform: its first-token score is the mean of 1/(i+1)."""
    model = hl.load(tiny_folder("gpt2"), device="cpu")
    attn = model.attention_module(0)
    with torch.no_grad():
        w = attn.c_attn.weight  # Conv1D [in, 3*E]: q | k | v
        e = w.shape[0]
        saved = w.clone()
        w[:, :e] = 0.0  # queries 0: every head attends uniformly → first-token score = mean 1/(i+1)
        attn.c_attn.bias[:e] = 0.0
    try:
        scores = induction_scan(model, InductionParams(seq_len=6, batch=2), progress=False)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    expected = torch.tensor([1.0 / (i + 1) for i in range(1, 13)]).mean()
    assert torch.allclose(scores.maps["first_token"][0], expected.expand(4), atol=1e-6)


def test_result_roundtrip_and_top(gpt2, tmp_path):
    scores = induction_scan(gpt2, InductionParams(seq_len=5, batch=2), progress=False)
    scores.save(tmp_path)
    data = json.loads((tmp_path / "scores.json").read_text())
    assert {"analysis", "model", "scores", "meta", "params", "maps"} <= set(data)
    assert len(data["scores"]) == 2 and len(data["scores"][0]) == 4
    back = HeadScores.load(tmp_path)
    assert torch.equal(back.scores, scores.scores) and torch.equal(back.items["tokens"], scores.items["tokens"])
    top = back.top(3)
    flat = scores.scores.flatten().sort(descending=True).values[:3]
    assert [s for _, s in top] == pytest.approx(flat.tolist())
    assert back.params["seq_len"] == 5 and back.meta["n_heads"] == 4


def test_figures(gpt2):
    scores = induction_scan(gpt2, InductionParams(seq_len=5, batch=2), progress=False)
    fig = scores.figure("prev_token")
    assert fig.data[0].z is not None and len(fig.data[0].z) == 2
    run = gpt2.run([5, 6, 5, 6, 7])
    fig = run.figure(hl.HeadRef(1, 0), window=(1, 4))
    assert list(fig.layout.xaxis.ticktext) == ["1:'#6'", "2:'#5'", "3:'#6'"]
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 3]
    same = hl.viz.pattern(run.pattern(hl.HeadRef(1, 0))[0], run.tokens(), window=(1, 4))
    assert same.data[0].z == fig.data[0].z and same.data[0].zmin == 0.0 and same.data[0].zmax == 1.0
    signed = hl.viz.pattern(torch.tensor([[1.0, 0.0], [-2.0, 0.5]]), ["a", "b"])
    assert (signed.data[0].zmin, signed.data[0].zmax, signed.data[0].zmid) == (-2.0, 2.0, 0.0)
    with pytest.raises(ValueError, match=r"\[Q, S\]"):
        hl.viz.pattern(run.pattern(hl.HeadRef(1, 0)), run.tokens())
    ticks, labels = token_ticks(["a", "a"])
    assert ticks == [0, 1] and labels[0] != labels[1]


def test_cli_scan_induction(tiny_folder, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["scan", "induction", "--model", str(tiny_folder("gpt2")), "--out", str(out), "--seq-len", "6",
                 "--batch", "2", "--device", "cpu"])
    assert code == 0
    data = json.loads((out / "scores.json").read_text())
    assert data["analysis"] == "induction" and len(data["scores"]) == 2
    assert (out / "heatmap_induction.html").exists() and list(out.glob("pattern_L*H*.html"))
    printed = capsys.readouterr().out
    assert "top" in printed and "L" in printed


def test_cli_bad_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "not-a-model"]) == 2
    assert "unknown model 'not-a-model'" in capsys.readouterr().err
