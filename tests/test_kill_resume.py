"""SIGKILL in the middle of a result write, then rerun the same command: the results equal an uninterrupted run.

Every result file is written through `headlab.results` (temp file, fsync, `os.replace`), so the child process is
killed at its k-th `os.replace` — after the new file is fully written but before it replaces the old one, the worst
moment for a writer that trusts what it finds. (The pruning command's mid-line kill is in test_prune_experiment.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from headlab.results import HeadScores

KILLER = textwrap.dedent("""
    import os, signal, sys
    real, count, at = os.replace, [0], int(sys.argv[1])
    def replace(*args, **kwargs):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    os.replace = replace
    from headlab.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _killed(argv: list[str], at: int) -> None:
    out = subprocess.run([sys.executable, "-c", KILLER, str(at), *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-identical, NaN where NaN."""
    return x.shape == y.shape and x.dtype == y.dtype and bool(((x == y) | (x.isnan() & y.isnan())).all()) \
        if x.is_floating_point() else torch.equal(x, y)


def _run(argv: list[str]) -> None:
    from headlab.cli import main

    assert main(argv) == 0


@pytest.mark.parametrize("at", [1, 2])
def test_scan_sinks(tmp_path, at):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([list(range(1, 41)), list(range(41, 81))]))
    common = ["scan", "sinks", "--model", "toy-induction", "--device", "cpu", "--prompts", str(prompts),
              "--n-prompts", "2", "--max-tokens", "40", "--min-visible", "4"]
    _killed(common + ["--out", str(tmp_path / "a")], at)  # 1: items' temp file written; 2: items done, no scores.json
    assert not HeadScores.saved(tmp_path / "a")
    _run(common + ["--out", str(tmp_path / "a")])
    _run(common + ["--out", str(tmp_path / "b")])
    a, b = HeadScores.load(tmp_path / "a"), HeadScores.load(tmp_path / "b")
    assert all(_same(a.maps[k], b.maps[k]) for k in b.maps)
    assert all(_same(a.items[k], b.items[k]) for k in b.items)


def test_icl_train(tmp_path):
    from headlab.icl.training import ICLRun

    common = ["icl", "train", "--steps", "150", "--checkpoint-every", "50", "--batch", "64", "--no-progress",
              "--no-figures"]
    _killed(common + ["--out", str(tmp_path / "a")], 3)  # the second checkpoint's tensors are written, not renamed
    _run(common + ["--out", str(tmp_path / "a")])
    _run(common + ["--out", str(tmp_path / "b")])
    a, b = ICLRun.load(tmp_path / "a"), ICLRun.load(tmp_path / "b")
    assert a.step == b.step == 150
    bad = [k for k in b.history if not _same(a.history[k], b.history[k])]
    assert not bad, bad
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_train_twins(tmp_path):
    common = ["train", "twins", "--tasks", "recall", "--kinds", "gla,linear", "--steps", "3", "--no-progress"]
    _killed(common + ["--out", str(tmp_path / "a")], 2)  # the first twin's card written, its run.json not
    assert not (tmp_path / "a" / "recall-gla" / "run.json").exists()
    _run(common + ["--out", str(tmp_path / "a")])
    _run(common + ["--out", str(tmp_path / "b")])
    for twin in ("recall-gla", "recall-linear"):
        a = json.loads((tmp_path / "a" / twin / "run.json").read_text())
        b = json.loads((tmp_path / "b" / twin / "run.json").read_text())
        assert a["eval"] == b["eval"] and a["curve"] == b["curve"]


@pytest.mark.slow
@pytest.mark.parametrize("at", [2, 4])
def test_calibrate(tmp_path, at):
    common = ["calibrate", "--model", "smollm2-135m", "--device", "cpu", "--tasks", "antonyms", "--n-calib", "4",
              "--n-eval", "4", "--candidates", "2", "--layers", "2:3"]
    _killed(common + ["--out", str(tmp_path / "a")], at)  # mid-search: the state file's next version not renamed in
    _run(common + ["--out", str(tmp_path / "a")])
    _run(common + ["--out", str(tmp_path / "b")])
    a, b = HeadScores.load(tmp_path / "a"), HeadScores.load(tmp_path / "b")
    assert all(_same(a.maps[k], b.maps[k]) for k in b.maps)
    assert a.meta["tables"] == b.meta["tables"] and a.meta["candidates"] == b.meta["candidates"]


@pytest.mark.slow
def test_scan_retrieval(tmp_path):
    """Killed while writing the final report (after the trial was decoded and appended): the rerun decodes nothing
    again and writes the same report."""
    from headlab.analyses.razor import RetrievalReport

    common = ["scan", "retrieval", "--model", "smollm2-135m", "--device", "cpu", "--lengths", "256", "--depths", "50",
              "--needles", "0", "--ks", "--windows", "--razor-block", "64", "--max-new-tokens", "32"]
    _killed(common + ["--out", str(tmp_path / "a")], 3)  # razor/ saved (2 renames), trials appended, report not
    trials = (tmp_path / "a" / "trials.jsonl").read_text()
    assert trials and not HeadScores.saved(tmp_path / "a")
    _run(common + ["--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "trials.jsonl").read_text() == trials  # nothing decoded again
    _run(common + ["--out", str(tmp_path / "b")])
    a, b = RetrievalReport.load(tmp_path / "a"), RetrievalReport.load(tmp_path / "b")
    assert _same(a.scores.scores, b.scores.scores) and a.summary == b.summary
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.records]


def test_scan_sinks_cuts_prompts_to_a_short_context_before_encoding(tmp_path):
    """The default KJV passages are longer than a 64-position model: they are cut, not refused."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    import headlab as hl
    from headlab.analyses.sinks import SinkParams, kjv_prompts, sink_scan

    words = sorted({w for p in kjv_prompts(2) for w in p.split()})[:500]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<bos>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(words) + 2, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    model = hl.load(tmp_path, device="cpu")
    scores = sink_scan(model, params=SinkParams(n_prompts=2, max_tokens=160), progress=False)
    assert scores.items["tokens"].shape == (2, 64)
