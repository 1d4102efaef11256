"""Retrieval heads on a planted model: a GPT-2 whose copy (induction) head is set by hand, in its weights.

Layer 0: head 0 is a previous-token head (absolute positions), head 1 a sink head (attends to BOS).
Layer 1: head 0 is an induction head that copies the token after the earlier occurrence of the
current token, head 1 an echo head (attends to earlier copies of the current token, writes nothing).
MLPs are zero; each LayerNorm's gain and bias undo its normalisation for the residual stream it sees.
The prompt is `[BOS] hay needle hay [Q] cue`: the cue is the needle's first token, so the model
recalls the needle by copying it, and the induction head should be the top retrieval head.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.analyses.razor import Condition, RazorParams, echo_induction_scan, masking_conditions, retrieval_kv_heads
from headlab.analyses.retrieval import (NeedlePrompt, RetrievalParams, Trial, find_span, recall, retrieval_scan,
                                        retrieval_scores, run_grid, run_trial, words)
from headlab.edits.kv_policy import RazorKV

V, N, E, HD = 32, 128, 256, 128  # vocab, positions, d_model, head dim
TOK, POS, PREV, OUT = 0, V, V + N, 2 * V + N  # residual subspaces: token, position, previous token, copied token
BOS, QMARK, END = 0, 1, 30
NEEDLE = list(range(20, 30))  # the needle's tokens; END follows it
HAY = list(range(2, 20))


def _ln(ln: torch.nn.LayerNorm, ones: int, eps: float) -> None:
    """Gain and bias that make LayerNorm the identity on residuals holding `ones` one-hot entries."""
    mean = ones / E
    std = math.sqrt(ones / E - mean**2 + eps)
    ln.weight.fill_(std)
    ln.bias.fill_(mean)


def planted_gpt2() -> hl.HeadModel:
    """The 2-layer, 2-head planted model described in the module docstring."""
    cfg = T.GPT2Config(vocab_size=V, n_positions=N, n_embd=E, n_layer=2, n_head=2, bos_token_id=BOS,
                       eos_token_id=END, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(cfg).eval()
    a = 30.0 * math.sqrt(HD)  # logit 30 after the 1/sqrt(HD) scale
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight[torch.arange(V), TOK + torch.arange(V)] = 1.0
        tr.wpe.weight[torch.arange(N), POS + torch.arange(N)] = 1.0
        for layer, ones in ((0, 2), (1, 3)):
            block = tr.h[layer]
            _ln(block.ln_1, ones, cfg.layer_norm_epsilon)
            _ln(block.ln_2, ones, cfg.layer_norm_epsilon)
        w0, p0 = tr.h[0].attn.c_attn.weight, tr.h[0].attn.c_proj.weight  # [E, 3E] (x @ W), [E, E]
        w0[POS + torch.arange(N), torch.arange(N)] = a  # head 0 query: position i
        w0[POS + torch.arange(N - 1), E + torch.arange(1, N)] = 1.0  # head 0 key: position j + 1
        w0[TOK + torch.arange(V), 2 * E + torch.arange(V)] = 1.0  # head 0 value: the token
        p0[torch.arange(V), PREV + torch.arange(V)] = 1.0  # → previous-token subspace
        w0[POS + torch.arange(N), HD] = a  # head 1 (sink): every query ...
        w0[POS, E + HD] = 1.0  # ... matches position 0 only
        w1, p1 = tr.h[1].attn.c_attn.weight, tr.h[1].attn.c_proj.weight
        w1[TOK + torch.arange(V), torch.arange(V)] = a  # head 0 (induction) query: the current token
        w1[PREV + torch.arange(V), E + torch.arange(V)] = 1.0  # key: the token before each position
        w1[TOK + torch.arange(V), 2 * E + torch.arange(V)] = 1.0  # value: the token there
        p1[torch.arange(V), OUT + torch.arange(V)] = 1.0  # → copied-token subspace
        w1[TOK + torch.arange(V), HD + torch.arange(V)] = a  # head 1 (echo) query: the current token
        w1[TOK + torch.arange(V), E + HD + torch.arange(V)] = 1.0  # key: the token itself; writes nothing
        _ln(tr.ln_f, 4, cfg.layer_norm_epsilon)
        model.lm_head.weight[torch.arange(V), OUT + torch.arange(V)] = 20.0
    return hl.load(model, device="cpu")


@pytest.fixture(scope="module")
def planted():
    return planted_gpt2()


def planted_prompt(trial: Trial) -> NeedlePrompt:
    """`[BOS] hay needle END hay [Q] cue` with about `trial.length` tokens; the answer is the needle after the cue."""
    gen = torch.Generator().manual_seed(trial.needle * 1000 + trial.length)
    n_hay = trial.length - len(NEEDLE) - 4
    hay = [HAY[i] for i in torch.randint(len(HAY), (n_hay,), generator=gen).tolist()]
    at = int(n_hay * trial.depth / 100)
    ids = [BOS] + hay[:at] + NEEDLE + [END] + hay[at:] + [QMARK, NEEDLE[0]]
    answer = NEEDLE[1:]
    return NeedlePrompt(tuple(ids), find_span(ids, [answer]), tuple(answer))


def test_planted_model_copies_the_needle(planted):
    prompt = planted_prompt(Trial(0, 80, 30.0))
    rec = run_trial(planted, prompt, [Condition(name="baseline", score=True)], max_new_tokens=20)[0]
    assert rec["generated"] == NEEDLE[1:]  # END stops decoding
    assert rec["recall"] == 1.0 and rec["found"]


def test_planted_copy_head_is_the_top_retrieval_head(planted):
    trials = [Trial(n, length, d) for n in range(2) for length in (40, 100) for d in (10.0, 50.0, 90.0)]
    records = run_grid(planted, planted_prompt, trials, [Condition(name="baseline", score=True)],
                       max_new_tokens=20, progress=False)
    scores = retrieval_scores(planted, records)
    (top, value), (_, second) = scores.top(2)
    assert top == hl.HeadRef(1, 0)
    assert value == pytest.approx(1.0, abs=1e-6)  # every step copies from the needle span: 9 × 1/9
    assert second == 0.0
    assert scores.meta["n_counted"] == len(trials)
    assert scores.meta["share_above_0_1"] == pytest.approx(0.25)


def test_masking_the_copy_head_breaks_recall_and_a_random_head_does_not(planted):
    prompt = planted_prompt(Trial(1, 90, 20.0))
    conds = [Condition(name=f"{how}-{h}", mask=(h,), how=how) for how in ("uniform", "zero")
             for h in (hl.HeadRef(1, 0), hl.HeadRef(1, 1))]
    recs = {r["condition"]: r for r in run_trial(planted, prompt, conds, max_new_tokens=12)}
    for how in ("uniform", "zero"):
        assert recs[f"{how}-L1H0"]["recall"] < 0.3
        assert recs[f"{how}-L1H1"]["recall"] == 1.0


def test_masking_conditions_draw_random_heads_outside_the_top(planted):
    records = run_grid(planted, planted_prompt, [Trial(0, 60, 50.0)], [Condition(name="baseline", score=True)],
                       max_new_tokens=12, progress=False)
    conds = masking_conditions(retrieval_scores(planted, records), [1], draws=3, exclude_top=0.25)
    assert conds[0].name == "top1-uniform" and conds[0].mask == (hl.HeadRef(1, 0),)
    assert all(hl.HeadRef(1, 0) not in c.mask and len(c.mask) == 1 for c in conds[1:])


def test_echo_and_induction_scores_pick_the_planted_heads(planted):
    scores = echo_induction_scan(planted, RazorParams(block=24, repeats=4, batch=2), progress=False)
    assert scores.top(1, map="induction")[0][0] == hl.HeadRef(1, 0)
    assert scores.top(1, map="echo")[0][0] == hl.HeadRef(1, 1)
    assert scores.maps["induction"][1, 0] > 0.5 and scores.maps["echo"][1, 1] > 0.3  # echo also sees itself
    assert retrieval_kv_heads(scores) == {(1, 0)}  # round(14% × 4) = 1 by induction; round(1% × 4) = 0 by echo


def test_razor_keeps_recall_with_the_copy_head_full_and_loses_it_without(planted):
    prompt = planted_prompt(Trial(0, 100, 20.0))
    policy = RazorKV(full=frozenset({(1, 0)}), sinks=1, window=8)
    conds = [Condition(name="razor", kv_policy=policy),
             Condition(name="window", kv_policy=RazorKV(full=frozenset(), sinks=1, window=8))]
    recs = {r["condition"]: r for r in run_trial(planted, prompt, conds, max_new_tokens=12)}
    assert recs["razor"]["recall"] == 1.0
    assert recs["window"]["recall"] < 0.3
    kv = recs["razor"]["kv"]
    n = len(prompt.ids) + len(recs["razor"]["generated"])
    assert kv["full_entries"] == 4 * n
    assert kv["fraction"] < 0.5 and kv["kept_entries"] == n + 3 * (1 + 8 + 1 + (n - (len(prompt.ids) - 1)))


def test_scan_end_to_end_resumes_from_its_trials_file(planted, tmp_path, monkeypatch):
    params = RetrievalParams(lengths=(50, 90), depths=(20.0, 70.0), needles=(0,), max_new_tokens=12, ks=(1,),
                             draws=2, exclude_top=0.25, windows=(8,), sinks=1, razor=RazorParams(block=24))
    report = retrieval_scan(planted, params, out=tmp_path, make_prompt=planted_prompt, progress=False)
    assert report.scores.top(1)[0][0] == hl.HeadRef(1, 0)
    s = report.summary
    assert s["baseline"]["accuracy"] == 1.0 and s["razor-w8"]["accuracy"] == 1.0
    assert s["top1-uniform"]["accuracy"] < 0.3 and s["random1-uniform-0"]["accuracy"] == 1.0
    assert s["window-w8"]["accuracy"] < 0.3 and s["razor-w8"]["kv_fraction"] < 1.0
    for name in ("scores.json", "summary.json", "trials.jsonl", "razor/scores.json", "retrieval_heatmap.html",
                 "needle_accuracy.html", "masking.html", "kv_accuracy.html"):
        assert (tmp_path / name).exists(), name
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 4 * (1 + 2 + 1 + 2)  # trials × (baseline, razor, window, top1, 2 random)
    from headlab.analyses.razor import RetrievalReport

    back = RetrievalReport.load(tmp_path)  # what the scan wrote loads back as the object it returned
    assert back.summary == report.summary and back.records == report.records and back.mask_how == report.mask_how
    assert torch.equal(back.scores.scores, report.scores.scores) and torch.equal(back.razor.scores, report.razor.scores)

    def boom(*args, **kwargs):
        raise AssertionError("a finished trial was run again")

    with (tmp_path / "trials.jsonl").open("a") as f:
        f.write('{"trial": "n0-L50')  # a line cut short by an interrupted run
    monkeypatch.setattr("headlab.analyses.retrieval.run_trial", boom)
    again = retrieval_scan(planted, params, out=tmp_path, make_prompt=planted_prompt, progress=False)
    assert again.summary == report.summary
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == len(lines) + 1
    monkeypatch.undo()
    more = retrieval_scan(planted, dataclasses.replace(params, depths=(20.0, 70.0, 95.0)), out=tmp_path,
                          make_prompt=planted_prompt, progress=False)  # new trials go on a fresh line
    assert more.summary["baseline"]["n"] == 6 and more.summary["razor-w8"]["accuracy"] == 1.0
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == len(lines) + 1 + 2 * 6


def test_find_span_and_recall_follow_the_authors_rules():
    ids = [5, 1, 2, 3, 4, 9, 1, 2, 3, 4, 6]
    assert find_span(ids, [[1, 2, 3, 4, 6]]) == (6, 11)  # the first window with overlap > 0.9
    with pytest.raises(hl.PromptError):
        find_span(ids, [[1, 2, 3, 7, 8]])
    assert words("Ride the OLD tram, by the river!") == ["ride", "the", "old", "tram", "by", "the", "river"]
    assert recall(words("the old tram by the river"), words("The tram by the river.")) == pytest.approx(5 / 6)
    assert recall([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)


def test_cli_arguments_reach_the_scan(monkeypatch, tmp_path, capsys):

    from headlab.analyses import retrieval

    seen = {}

    def fake_scan(model, params, out, executor=None):
        seen.update(params=params, out=out, executor=executor)
        records = [{"condition": "baseline", "recall": 1.0, "found": True, "scores": [[0.0]]}]
        scores = retrieval.retrieval_scores(model, records)
        scores.meta["seconds"] = 0.0
        return retrieval.RetrievalReport(scores, scores, records, retrieval.summarize(records))

    class Tiny:
        n_layers, n_heads, n_kv_heads, head_dim, causal, name, note, backend = 1, 1, 1, 4, True, "tiny", "", "sdpa"
        hf, device, dtype = torch.nn.Linear(1, 1), torch.device("cpu"), torch.float32

    from headlab.cli import build_parser
    from headlab.cli import scan as scan_cli

    monkeypatch.setattr(scan_cli, "load_model", lambda *a, **k: Tiny())
    monkeypatch.setattr(retrieval, "retrieval_scan", fake_scan)
    args = build_parser().parse_args(["scan", "retrieval", "--out", str(tmp_path), "--lengths", "256", "512", "--depths", "50",
                              "--ks", "--windows", "32", "--mask-how", "zero", "--mask-lengths", "512"])
    assert args.handler(args) == 0
    p = seen["params"]
    assert (p.lengths, p.depths, p.ks, p.windows, p.mask_how, p.mask_lengths) == ((256, 512), (50.0,), (), (32,),
                                                                                  "zero", (512,))
    assert seen["executor"].name == "local"  # the default
    assert "baseline" in capsys.readouterr().out
