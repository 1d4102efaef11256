"""Linearizing a Llama-family model head by head: the HybridMixer's pattern is the layer's operator, all-softmax is
the base bit for bit, decoding from the KV cache equals the full forward, attention transfer trains and resumes, the
scans run unchanged on the linearized model, and the hybrid sweep keeps the hardest heads softmax."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.analyses.induction import induction_scan
from headlab.analyses.sinks import sink_scan
from headlab.linearize import TransferParams, build_linearized, train_layer
from headlab.linearize.analysis import HybridParams, hardest, hybrid_sweep, relate, transfer_report, type_maps
from headlab.models.linearized import HeadlabLinearizedForCausalLM, from_base
from test_explore import WORDS

TEXT = " ".join(["the cat sat on the mat . the dog ran in the park , and a cat ran ."] * 60)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random Llama (4 heads in 2 KV groups) with a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, bos_token_id=0)
    folder = tmp_path_factory.mktemp("tiny_llama_text")
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(base_folder):
    return hl.load(str(base_folder))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _ids(seed, shape=(2, 20)):
    return torch.randint(2, len(WORDS), shape, generator=torch.Generator().manual_seed(seed))


def test_all_softmax_is_the_base_and_patterns_are_the_operator(base):
    ids = _ids(0)
    lin = from_base(base.hf, softmax_heads=[[0, 1, 2, 3]] * 2)
    lm = hl.HeadModel(lin, base.tokenizer, name="lin")
    with torch.no_grad():
        assert torch.equal(lm.hf(ids).logits, base.hf(ids).logits)
    for softmax in ([[], []], [[1], [0, 3]]):
        lin.set_softmax_heads(softmax)
        run = lm.run(ids, with_z=True)
        for layer, rec in run.records.items():
            z = torch.matmul(rec.pattern(), rec.v.repeat_interleave(2, 1).float()).transpose(1, 2)
            torch.testing.assert_close(z, rec.z.float(), atol=1e-5, rtol=1e-4)
            p = rec.pattern()
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-4, rtol=0)
            for h in softmax[layer] if layer == 0 else []:  # a softmax head's pattern is the base's (same input)
                ref = base.run(ids, layers=[layer]).records[layer].pattern([h])
                torch.testing.assert_close(p[:, h:h + 1], ref, atol=1e-5, rtol=1e-4)


def test_decode_from_the_kv_cache_equals_the_full_forward(base):
    lin = from_base(base.hf, softmax_heads=[[2], []])
    lm = hl.HeadModel(lin, base.tokenizer, name="lin")
    ids = _ids(1, (1, 16))
    with torch.no_grad():
        full = lin(ids).logits[0]
    logits, cache = lm.forward_cached(ids[:, :10])
    torch.testing.assert_close(logits, full[9], atol=1e-4, rtol=1e-4)
    for t in range(10, 16):
        logits, cache = lm.forward_cached(ids[:, t:t + 1], cache)
        torch.testing.assert_close(logits, full[t], atol=1e-4, rtol=1e-4)
    with lm.capturing(layers=[0]) as cap:  # the decode step's pattern row over every cached key
        lm.forward_cached(ids[:, :1], cache)
    row = cap.records[0].pattern()
    assert row.shape[-2:] == (1, 17)
    torch.testing.assert_close(row.sum(-1), torch.ones_like(row.sum(-1)), atol=1e-4, rtol=0)


def test_attention_transfer_fits_and_the_build_resumes(base, text_file, tmp_path, monkeypatch):
    run = base.run(_ids(2, (4, 24)))
    q, k, v = (t.float() for t in (run.records[0].q, run.records[0].k, run.records[0].v))
    _, _, curve = train_layer(q, k, v, base.head_dim ** -0.5, TransferParams(steps=60, feature_dim=16))
    assert curve[-1][1] < 0.5 * curve[0][1] and curve[-1][2] < curve[0][2]
    params = TransferParams(steps=20, feature_dim=16, windows=4, seq_len=24, text=str(text_file))
    full = build_linearized(base, tmp_path / "a", params, progress=False)
    import headlab.linearize.transfer as transfer

    calls = {"n": 0}
    real = transfer.train_layer

    def stop_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(transfer, "train_layer", stop_second)
    with pytest.raises(KeyboardInterrupt):
        build_linearized(base, tmp_path / "b", params, progress=False)
    monkeypatch.setattr(transfer, "train_layer", real)
    resumed = build_linearized(base, tmp_path / "b", params, progress=False)
    a, b = hl.load(str(full)), hl.load(str(resumed))
    assert isinstance(a.hf, HeadlabLinearizedForCausalLM) and a.layer_kinds == ["hedgehog", "hedgehog"]
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(a.hf(ids).logits, b.hf(ids).logits)
    with pytest.raises(hl.HeadlabError, match="other settings"):
        build_linearized(base, tmp_path / "a", TransferParams(steps=21, text=str(text_file)), progress=False)


def test_scans_report_and_hybrid_sweep_on_the_linearized_model(base, text_file, tmp_path):
    folder = build_linearized(base, tmp_path / "lin", TransferParams(steps=10, feature_dim=16, windows=4, seq_len=24,
                                                                     text=str(text_file)), progress=False)
    lin = hl.load(str(folder))
    ind = induction_scan(lin, progress=False)  # the scans run unchanged
    assert torch.isfinite(ind.maps["induction"]).all()
    sinks = sink_scan(lin, ["the cat sat on the mat ."] * 2, progress=False)
    assert sinks.maps["sink_share"].shape == (2, 4)
    types = type_maps(base)
    report = transfer_report(base, lin, text=text_file, windows=2, seq_len=24, types=types, progress=False)
    assert report.maps["rel_error"].shape == (2, 4) and bool((report.maps["rel_error"] > 0).all())
    rel = relate(report)
    assert set(rel) >= {"induction", "prev_token", "sink", "entropy"}
    k2 = hardest(report, 2)
    flat = report.maps["rel_error"].flatten()
    assert sum(len(r) for r in k2) == 2 and {l * 4 + h for l, r in enumerate(k2) for h in r} == set(
        flat.argsort(descending=True)[:2].tolist())
    params = HybridParams(ks=(0, 2, 8), text=str(text_file), windows=2, ctx=24, needles=())
    rows = hybrid_sweep(lin, report, params, out=tmp_path / "hyb", progress=False)
    assert [r["k"] for r in rows] == [0, 2, 8]
    assert rows[-1]["loss"] == pytest.approx(float(_text_loss(base, text_file)), rel=1e-4)  # all softmax: the base
    assert lin.hf.config.softmax_heads == [[], []]  # restored
    again = hybrid_sweep(lin, report, params, out=tmp_path / "hyb", progress=False)
    assert again == rows


def _text_loss(model, path):
    from headlab.prune.evals import TextEval

    return TextEval(path=str(path), ctx=24, windows=2).loss(model)


def test_cli_build_and_analyse(base_folder, text_file, tmp_path, capsys):
    from headlab.cli import main

    assert main(["linearize", "build", "--model", str(base_folder), "--out", str(tmp_path / "b"), "--steps", "5",
                 "--windows", "4", "--seq-len", "24", "--feature-dim", "8", "--text", str(text_file)]) == 0
    out = capsys.readouterr().out
    assert "linearized model:" in out and (tmp_path / "b" / "model" / "config.json").is_file()
    assert main(["linearize", "analyse", "--model", str(base_folder), "--linearized", str(tmp_path / "b" / "model"),
                 "--out", str(tmp_path / "a"), "--ks", "0,8", "--needle-lengths", "", "--windows", "2"]) == 0
    import json

    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [r["k"] for r in report["hybrid"]] == [0, 8] and {"induction", "sink"} <= set(report["relate"])
    capsys.readouterr()
    assert main(["linearize", "analyse", "--model", str(base_folder), "--linearized", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "a")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_retrieval_scoring_reads_linear_heads_decode_rows(base):
    """A scoring needle trial on an all-linear model: the top-1 key of each head's decode row comes from the
    implicit pattern over every key (the cache keeps them for scoring), equal to the full forward's row."""
    from headlab.analyses.razor import Condition
    from headlab.analyses.retrieval import NeedlePrompt, run_trial

    lin = hl.HeadModel(from_base(base.hf), base.tokenizer, name="lin")
    ids = _ids(9, (1, 30))[0].tolist()
    prompt = NeedlePrompt(ids=tuple(ids), span=(10, 14), reference=tuple(ids[10:14]))
    rec = run_trial(lin, prompt, [Condition(name="baseline", score=True)], max_new_tokens=1)[0]
    assert "scores" in rec and len(rec["scores"]) == 2
    # the decode row of the last prompt token over every key equals the full forward's row
    run = lin.run(torch.tensor([ids]))
    with lin.capturing(layers=[0]) as cap:
        _, cache = lin.forward_cached(torch.tensor([ids[:-1]]), keep_keys=True)
        lin.forward_cached(torch.tensor([[ids[-1]]]), cache)
    torch.testing.assert_close(cap.records[0].pattern()[0, :, 0], run.records[0].pattern()[0, :, len(ids) - 1],
                               atol=1e-5, rtol=1e-4)
