"""The offline tasks, option scoring, intervals, the ACT head search (planted) and the sink/calibrate commands."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import headlab.analyses.calibration as calibration
from headlab.analyses.calibration import CalibrationParams, calibration_search, table_lines
from headlab.analyses.sinks import SinkRule
from headlab.edits.calibrate import Calibrate
from headlab.edits.heads import edit
from headlab.heads import HeadRef
from headlab.results import HeadScores
from headlab.tasks.choice import DATA
from headlab.tasks import EncodedItems, build_tasks, correct, option_logprobs, paired_bootstrap, wilson
from test_sinks import SINK_HEAD, TARGET, planted_model, planted_prompts

QUERY = {"categories": r"Word: (\S+)\nCategory:$", "sentiment": r"Review: (.+)\nSentiment:$",
         "antonyms": r"The opposite of (\S+) is$"}


ADJECTIVES = {w for ws in json.loads((DATA / "sentiment.json").read_text())["words"].values() for w in ws}


def _query(item) -> str:
    return re.search(QUERY[item.task], item.prompt).group(1)


def test_tasks_are_seeded_and_splits_disjoint():
    a = build_tasks(["categories", "sentiment", "antonyms"], n_calib=20, n_eval=60, seed=3)
    b = build_tasks(["categories", "sentiment", "antonyms"], n_calib=20, n_eval=60, seed=3)
    assert a == b
    assert build_tasks(["antonyms"], n_calib=20, n_eval=60, seed=4)[0] != a[2]
    for split in a:
        assert len(split.calibration) == 20 and 50 <= len(split.evaluation) <= 60
        calib_text = " ".join(it.prompt for it in split.calibration)
        for it in split.evaluation:
            assert 0 <= it.answer < len(it.options) and len(set(it.options)) == len(it.options)
            word = _query(it) if split.name != "sentiment" else next(w for w in re.findall(r"\w+", _query(it))
                                                                      if w in ADJECTIVES)
            shown = it.prompt.rsplit("\n\n", 1)[0] if split.name != "antonyms" else it.prompt.rsplit("\n", 1)[0]
            assert not re.search(rf"\b{re.escape(word)}\b", calib_text), (split.name, word)
            assert not re.search(rf"\b{re.escape(word)}\b", shown), (split.name, word)
    antonym = a[2].evaluation[0]
    assert _query(antonym) in antonym.options  # the copying lure
    with pytest.raises(KeyError):
        build_tasks(["trivia"], n_calib=1, n_eval=1)


def test_correct_wilson_and_bootstrap():
    lp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0], [-3.0, -0.5]])
    assert correct(lp, torch.tensor([0, 0, 0])).tolist() == [True, False, False]  # a tie is wrong
    lo, hi = wilson(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    same = torch.tensor([True, False] * 10)
    assert paired_bootstrap(same, same) == (0.0, 0.0)
    assert paired_bootstrap(torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)) == (1.0, 1.0)


def _amplified():
    """The planted model with L0H1's output made large, so that calibrating it changes answers."""
    model = planted_model()
    with torch.no_grad():
        attn = model.hf.model.layers[0].self_attn
        attn.v_proj.weight[:16] *= 20.0
        attn.o_proj.weight[:, 16:32] *= 20.0
    return model


def _items(model, params, n=48, seed=0) -> EncodedItems:
    """Token-id items whose right option is what the model answers with L0H1 calibrated, where that differs."""
    ids = planted_prompts(positions=(6,), batch=n, seed=seed)[:, :40]
    gen = torch.Generator().manual_seed(seed)
    options = torch.stack([torch.randperm(90, generator=gen)[:4] + 10 for _ in range(n)])
    items = EncodedItems([r.tolist() for r in ids], options, torch.zeros(n, dtype=torch.long), ["planted"] * n)
    base = option_logprobs(model, items).argmax(-1)
    with edit(model, Calibrate(heads=[SINK_HEAD], beta=params.beta, rule=params.rule,
                               first_exempt=params.first_exempt)):
        cal = option_logprobs(model, items).argmax(-1)
    keep = (cal != base).nonzero().flatten().tolist()
    keep += (cal == base).nonzero().flatten().tolist()[: len(keep)]  # half the items unchanged
    return EncodedItems([items.ids[i] for i in keep], options[keep], cal[keep], ["planted"] * len(keep))


def test_search_keeps_the_helpful_head_and_resumes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _amplified()
    params = CalibrationParams(beta=0.0, rule=SinkRule(min_visible=4), first_exempt=False, layers=(0, 1),
                               candidates=3, batch=8, bootstrap=200)
    calib, evals = _items(model, params, seed=0), _items(model, params, seed=1)
    assert len(calib) >= 4 and len(evals) >= 4
    out = tmp_path / "run"
    scores = calibration_search(model, params, out=out, items=(calib, evals), progress=False)
    assert SINK_HEAD in [HeadRef.parse(s) for s in scores.meta["candidates"]]
    assert str(SINK_HEAD) in scores.meta["heads"]
    assert scores.maps["kept"][SINK_HEAD.layer, SINK_HEAD.head] == 1.0
    assert scores.maps["calib_gain"][SINK_HEAD.layer, SINK_HEAD.head] > 0
    assert int(scores.maps["calib_gain"].isnan().logical_not().sum()) == 3
    row = scores.meta["tables"]["calibrated"][-1]
    assert row["task"] == "all" and row["after"] > row["before"] and row["delta_ci"][0] > 0
    assert any("calibrated" in line for line in table_lines(scores))
    state = json.loads((out / calibration.STATE_FILE).read_text())
    assert len(state["tried"]) == 3 and "eval_calibrated" in state

    def boom(*args, **kwargs):
        raise AssertionError("a resumed, finished run must not score again")

    monkeypatch.setattr(calibration, "_accuracy_items", boom)
    again = calibration_search(model, params, out=out, items=(calib, evals), progress=False)
    assert again.meta["tables"] == scores.meta["tables"]
    with pytest.raises(ValueError, match="other settings"):
        calibration_search(model, CalibrationParams(beta=0.5, layers=(0, 1)), out=out, items=(calib, evals))


def _parser() -> argparse.ArgumentParser:
    from headlab.cli import build_parser

    return build_parser()


def test_scan_sinks_command_writes_and_resumes(tmp_path, capsys):
    model = planted_model()
    folder = tmp_path / "planted"
    model.hf.save_pretrained(folder)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(planted_prompts(positions=(12, 28), batch=2).tolist()))
    argv = ["scan", "sinks", "--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "scan"),
            "--prompts", str(prompts), "--n-prompts", "2"]
    args = _parser().parse_args(argv)
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "#7" in printed and "first-token sink" in printed
    written = {p.name for p in (tmp_path / "scan").iterdir()}
    assert {"scores.json", "items.safetensors", "heatmap_sink_share.html"} <= written
    assert any(name.startswith(f"column_later_share_{SINK_HEAD}") for name in written)
    assert HeadScores.load(tmp_path / "scan").meta["sink_tokens"][0]["token"] == f"#{TARGET}"
    args = _parser().parse_args(argv)
    assert args.handler(args) == 0
    assert "holds this scan already" in capsys.readouterr().out


def test_calibrate_command_parses_to_params():
    args = _parser().parse_args(["calibrate", "--out", "x", "--tasks", "antonyms", "--layers", "3:7",
                                 "--threshold", "relative", "--alpha", "4", "--min-visible", "1",
                                 "--search", "independent", "--candidates", "5"])
    from headlab.cli.calibrate import cmd_calibrate
    from headlab.cli.common import rule_from_args

    assert args.handler is cmd_calibrate
    assert args.tasks == "antonyms" and args.layers == (3, 7) and args.search == "independent"
    assert rule_from_args(args) == SinkRule(threshold="relative", alpha=4.0, min_visible=1)
    assert list(CalibrationParams(layers=(3, 7)).layer_range(30)) == [3, 4, 5, 6, 7]
    assert list(CalibrationParams().layer_range(30)) == list(range(2, 29))
