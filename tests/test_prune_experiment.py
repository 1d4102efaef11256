"""Pruning experiments: rows, resumability, settings guard, held-out perplexity, and the `prune` command."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

import headlab as hl
from headlab.errors import HeadlabError
from headlab.prune import RANKERS, PruneParams, RankParams, TextEval, parse_eval, prune_experiment, read_rows
from headlab.prune.evals import CALIB_TEXT, HELDOUT_TEXT

TASK = "task:induction"
SMALL_RANK = RankParams(scan_seq_len=8, scan_batch=2)


@pytest.fixture(scope="module")
def model() -> hl.HeadModel:
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=160, bos_token_id=1,
                        initializer_range=0.05)
    torch.manual_seed(0)
    return hl.load(T.LlamaForCausalLM(cfg).eval())


def word_tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer over the 94 commonest words of the held-out text (+ unk, bos, pad)."""
    words = Counter(HELDOUT_TEXT.read_text().split()).most_common(94)
    vocab = {"<unk>": 0, "<bos>": 1, "<pad>": 2, **{w: i + 3 for i, (w, _) in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", pad_token="<pad>")


def test_rows_and_resume(model, tmp_path, monkeypatch):
    params = PruneParams(rankers=("random", "atp"), fractions=(0.0, 0.5), evals=(TASK,), rank=SMALL_RANK)
    first = prune_experiment(model, params, tmp_path, progress=False)
    assert len(first.rows) == 4 and len(read_rows(tmp_path)) == 4
    row = first.rows[-1]
    assert row["n_removed"] == 4 and row["n_heads"] == 8 and row["seed"] == 0 and row["task_seed"] == 1
    assert row["value"] == row["metrics"]["loss"] and len(row["removed"]) == 4
    zero = [r["value"] for r in first.rows if r["fraction"] == 0.0]
    assert zero[0] == zero[1]
    assert (tmp_path / "curve_task_induction.html").is_file()
    assert (tmp_path / "rankings" / "atp" / "scores.json").is_file()

    # resume: more fractions; the saved rankings are reused (recomputing one would raise) and old rows kept
    def boom(*args, **kwargs):
        raise AssertionError("a saved ranking was recomputed")

    monkeypatch.setitem(RANKERS, "atp", boom)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"ranker": "random", "fra')  # a torn last line (an interrupted run) is skipped
    more = PruneParams(rankers=("random", "atp"), fractions=(0.0, 0.25, 0.5), evals=(TASK,), rank=SMALL_RANK)
    second = prune_experiment(model, more, tmp_path, progress=False)
    assert len(second.rows) == 6
    assert {(r["ranker"], r["fraction"]) for r in second.rows} == {(n, f) for n in ("random", "atp")
                                                                    for f in (0.0, 0.25, 0.5)}
    assert second.table()["random"][0.5] == first.table()["random"][0.5]
    runs = json.loads((tmp_path / "run.json").read_text())
    assert len(runs["runs"]) == 2 and runs["identity"]["rank"]["seed"] == 0

    with pytest.raises(HeadlabError, match="other settings"):
        prune_experiment(model, PruneParams(rankers=("random",), fractions=(0.0,), evals=(TASK,), ctx=64,
                                            rank=SMALL_RANK), tmp_path, progress=False)


def test_removal_is_masking_least_important_first(model, tmp_path):
    params = PruneParams(rankers=("ablation",), fractions=(0.25,), evals=(TASK,), rank=SMALL_RANK)
    result = prune_experiment(model, params, tmp_path, progress=False)
    delta = result.rankings["ablation"].scores
    removed = [hl.HeadRef.parse(h) for h in result.rows[0]["removed"]]
    kept_min = min(float(delta[h.layer, h.head]) for h in model.heads() if h not in removed)
    assert max(float(delta[h.layer, h.head]) for h in removed) <= kept_min
    with hl.edit(model, hl.ablate(removed)):
        assert result.rows[0]["value"] == pytest.approx(float(parse_eval(TASK).loss(model)))
    assert result.atp_vs_ablation is None


def test_held_out_perplexity(tmp_path):
    tok = word_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=160,
                        bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    m = hl.load(T.LlamaForCausalLM(cfg).eval(), tokenizer=tok)
    ev = TextEval(path=str(HELDOUT_TEXT), ctx=32, windows=3, minibatch=2)
    tokens = ev.tokens(m)
    assert tokens.shape == (3, 33) and (tokens[:, 0] == tok.bos_token_id).all()
    metrics = ev.metrics(m)
    assert metrics["ppl"] == pytest.approx(math.exp(float(m.loss(tokens))), rel=1e-5)
    params = PruneParams(rankers=("sink", "atp"), fractions=(0.0, 0.5), evals=(f"ppl:{HELDOUT_TEXT}",), ctx=32,
                         windows=3, rank=RankParams(ctx=16, windows=2, scan_seq_len=8, scan_batch=2))
    result = prune_experiment(m, params, tmp_path, progress=False)
    assert result.rankings["atp"].meta["calibration"] == f"ppl:{CALIB_TEXT}"  # calibrated apart from held-out
    assert all(r["primary"] == "ppl" and r["value"] > 1 for r in result.rows)
    with pytest.raises(HeadlabError, match="fewer than"):
        TextEval(path=str(CALIB_TEXT), ctx=128, windows=10_000).tokens(m)


def _main(argv: list[str]) -> int:
    from headlab.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.handler(args)


def test_cli(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_folder("llama")), "--device", "cpu", "--rank-by", "random,atp",
            "--rank-by", "ablation", "--fractions", "0,0.25,...,0.5", "--eval", TASK, "--out", str(out),
            "--scan-seq-len", "8", "--scan-batch", "2", "--task-seq-len", "16", "--save-model", "atp:0.5",
            "--no-progress"]
    assert _main(argv) == 0
    text = capsys.readouterr().out
    assert "AtP vs exhaustive ablation: Spearman" in text and "task:induction" in text
    assert len(read_rows(out)) == 9
    from headlab.prune.experiment import PruneResults

    back = PruneResults.load(out)
    assert back.rows == read_rows(out) and set(back.rankings) == {"random", "atp", "ablation"}
    assert back.atp_vs_ablation is not None and back.table(TASK) == PruneResults(out, read_rows(out), {}).table(TASK)
    report = json.loads((out / "pruned-atp-0.5" / "prune_report.json").read_text())
    assert report["vs_masked_max_abs_diff"] < 1e-5 and report["vs_masked_max_abs_diff_float64"] < 1e-5
    assert report["equal_to_1e-5_in_float64"] and report["removed"] == 4
    assert report["params_ratio"] < 1 and 0 < report["kv_ratio"] <= 1
    assert _main(argv) == 0  # a rerun adds nothing
    assert len(read_rows(out)) == 9
    with pytest.raises(HeadlabError, match="unknown ranker"):
        _main(["prune", "--model", str(tiny_folder("llama")), "--rank-by", "nope", "--eval", TASK,
               "--out", str(tmp_path / "other"), "--no-progress"])


def test_headlab_command_has_prune():
    from headlab import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "prune" in sub.choices
    assert sub.choices["prune"].get_default("handler").__name__ == "cmd_prune"


@pytest.mark.slow
def test_smollm2_perplexity_and_atp():
    """SmolLM2 (4-bit dequantised instruct weights): held-out ppl, and AtP against ablation on 4 layers."""
    from headlab.prune import InductionTask, ablation_scores, atp_scores, spearman

    torch.set_num_threads(1)
    m = hl.load("smollm2-135m", device="cpu")
    ev = TextEval(path=str(HELDOUT_TEXT), ctx=64, windows=2)
    ppl = ev.metrics(m)["ppl"]
    assert 2 < ppl < 60, ppl
    calib = InductionTask(seq_len=20, batch=2, seed=2)
    heads = m.heads(layers=[15, 16, 17, 18])
    exhaustive = ablation_scores(m, calib, heads=heads, progress=False)["delta"][15:19]
    estimate = atp_scores(m, calib)["estimate"][15:19]
    assert float(exhaustive.max()) > 0.3  # the induction heads of layers 17-18 matter on this task
    assert spearman(estimate, exhaustive) > 0.5


def test_sigkill_mid_row_then_rerun_gives_the_uninterrupted_rows(tiny_folder, tmp_path):
    """A prune run killed while writing its 4th row (half a line on disk) resumes to the same rows as a clean run."""
    import signal
    import subprocess
    import sys
    import textwrap

    folder = tiny_folder("llama")
    argv = ["prune", "--model", str(folder), "--device", "cpu", "--rank-by", "random,atp", "--fractions",
            "0,0.25,0.5,0.75", "--eval", TASK, "--scan-seq-len", "8", "--scan-batch", "2", "--task-seq-len", "16",
            "--no-progress"]
    killed = tmp_path / "killed"
    code = textwrap.dedent(f"""
        import os, signal
        from headlab import results
        from headlab.cli import main
        real, count = results.append_jsonl, [0]
        def append(path, rows):
            count[0] += 1
            if count[0] == 4:  # half a line, then the process dies
                with open(path, "a") as f:
                    f.write('{{"ranker": "atp", "fra')
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, rows)
        import headlab.prune.experiment as ex
        ex.append_jsonl = append
        main({argv + ["--out", str(killed)]!r})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    with pytest.warns(UserWarning, match="unreadable"):
        assert len(read_rows(killed)) == 3
    from headlab.cli import main

    with pytest.warns(UserWarning, match="unreadable"):
        assert main(argv + ["--out", str(killed)]) == 0
    assert main(argv + ["--out", str(tmp_path / "clean")]) == 0

    def key(rows):
        return sorted((r["ranker"], r["fraction"], r["eval"], r["value"], tuple(r["removed"])) for r in rows)

    with pytest.warns(UserWarning, match="unreadable"):
        resumed = read_rows(killed)
    assert len(resumed) == 8 and key(resumed) == key(read_rows(tmp_path / "clean"))
