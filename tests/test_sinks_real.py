"""Sinks and ACT calibration on the real bundled models (slow).

SmolLM2's weights are a 4-bit (Q4_1) dequantisation of the instruct model.
"""

from __future__ import annotations

import time

import pytest
import torch

import headlab as hl
from headlab.analyses.sinks import SinkParams, SinkRule, sink_scan, summary_lines
from headlab.edits.calibrate import Calibrate
from headlab.tasks import build_tasks, correct, encode_items, option_logprobs

pytestmark = pytest.mark.slow

CHANCE = {"categories": 0.2, "sentiment": 0.5, "antonyms": 0.25}


@pytest.fixture(scope="module")
def smollm2():
    return hl.load("smollm2-135m", device="cpu")


def test_smollm2_first_token_and_the_sinks(smollm2):
    start = time.perf_counter()
    scores = sink_scan(smollm2, params=SinkParams(n_prompts=4, max_tokens=128), progress=False)
    print("\n".join(summary_lines(scores)), f"\n{time.perf_counter() - start:.1f} s")
    meta = scores.meta
    assert meta["prompt_tokens"][0][0] == "<|im_start|>"
    assert meta["share_first_sink"] > 0.7  # 83% of heads on 8 prompts × 160 tokens
    assert " the" in [e["token"] for e in meta["sink_tokens"][:2]]  # SmolLM2's non-initial sink
    the = next(e for e in meta["sink_tokens"] if e["token"] == " the")
    assert the["heads"] >= 30
    assert meta["raw_later_hits_in_tail"] > meta["later_hits"]  # without the tail rule most hits are tail keys
    assert scores.maps["first_score"].mean() > 0.3


def test_minilm_cls_sink():
    model = hl.load("minilm-l6", device="cpu")
    scores = sink_scan(model, params=SinkParams(n_prompts=8, max_tokens=160), progress=False)
    print("\n".join(summary_lines(scores)))
    meta = scores.meta
    assert meta["prompt_tokens"][0][0] == "[CLS]" and meta["prompt_tokens"][0][-1] == "[SEP]"  # [SEP] kept when cut
    assert meta["share_first_sink"] > 0.6  # [CLS]: 78% of heads
    assert float(scores.maps["later_share"][:5].max()) < float(scores.maps["later_share"][5].max())  # last layer


def test_smollm2_tasks_above_chance_and_calibration_scoped(smollm2):
    splits = build_tasks(["categories", "sentiment", "antonyms"], n_calib=2, n_eval=16, seed=0)
    for split in splits:
        items = encode_items(smollm2, split.evaluation, prepend_bos=True)
        acc = float(correct(option_logprobs(smollm2, items), items.answer).float().mean())
        print(f"{split.name}: {acc:.3f} on {len(items)} items (chance {CHANCE[split.name]})")
        assert acc > CHANCE[split.name] + 0.25
    items = encode_items(smollm2, splits[0].evaluation[:4], prepend_bos=True)  # sinks after BOS: "Class", " each"
    before = option_logprobs(smollm2, items)
    edit = Calibrate(heads=[hl.HeadRef(4, 4), hl.HeadRef(7, 1)], beta=0.4, rule=SinkRule(min_visible=16))
    with hl.edit(smollm2, edit):
        during = option_logprobs(smollm2, items)
    assert (during - before).abs().max() > 1e-3
    assert torch.equal(option_logprobs(smollm2, items), before)
