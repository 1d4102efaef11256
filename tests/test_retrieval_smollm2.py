"""Retrieval heads, head masking and RazorAttention on SmolLM2-135M (slow: a real model on CPU).

SmolLM2 weights are a 4-bit (Q4_1) dequantisation of the instruct model. Small grid: three needles
in 512-token KJV prompts; the full grid is scripts/retrieval_report.py.
"""

from __future__ import annotations


import pytest
import torch

import headlab as hl
from headlab.analyses.razor import RazorParams
from headlab.analyses.retrieval import RetrievalParams, retrieval_scan

pytestmark = pytest.mark.slow

INDUCTION_HEADS = {hl.HeadRef(17, 3), hl.HeadRef(18, 6), hl.HeadRef(17, 4)}  # shared/MODELS.md


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    return hl.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def report(smollm2):
    params = RetrievalParams(lengths=(512,), depths=(50.0,), needles=(0, 1, 2), ks=(10,), draws=1, windows=(64,),
                             razor=RazorParams(block=128))
    return retrieval_scan(smollm2, params, progress=False)


def test_needles_are_recalled_by_a_few_copy_heads(report):
    meta = report.scores.meta
    assert meta["n_counted"] == 3, [r["reply"] for r in report.records if r["condition"] == "baseline"]
    assert meta["share_above_0_1"] < 0.1  # sparse (the paper: under 5% of heads)
    top = [h for h, _ in report.scores.top(5)]
    assert INDUCTION_HEADS & set(top)
    best = top[0]
    assert (best.layer, best.head // 3) in set(map(tuple, meta["retrieval_kv"]))  # echo/induction pick it too


def test_masking_the_top_retrieval_heads_hurts_more_than_random_heads(report):
    s = report.summary
    assert s["top10-uniform"]["accuracy"] < s["random10-uniform-0"]["accuracy"] - 0.3
    assert s["random10-uniform-0"]["accuracy"] > 0.7


def test_razor_keeps_the_needle_that_a_plain_window_loses(report):
    s = report.summary
    assert s["razor-w64"]["kv_fraction"] < 0.35 and s["window-w64"]["kv_fraction"] < s["razor-w64"]["kv_fraction"]
    assert s["razor-w64"]["accuracy"] > s["window-w64"]["accuracy"] + 0.3


def test_cli_scan_writes_its_report_and_a_rerun_resumes(tmp_path, capsys):
    from headlab.cli import build_parser

    parser = build_parser()
    argv = ["scan", "retrieval", "--out", str(tmp_path), "--lengths", "256", "--depths", "50", "--needles", "0", "--ks",
            "--windows", "--razor-block", "64", "--max-new-tokens", "32"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    first = capsys.readouterr().out
    assert "1/1 trials recalled the needle" in first
    for name in ("trials.jsonl", "scores.json", "razor/scores.json", "retrieval_heatmap.html", "needle_accuracy.html"):
        assert (tmp_path / name).exists(), name
    lines = (tmp_path / "trials.jsonl").read_text()
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    assert (tmp_path / "trials.jsonl").read_text() == lines  # nothing decoded again
