"""Sink detection on a planted model, and ACT's calibration as a head edit (tiny models built here)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.analyses.sinks import (SinkParams, SinkRule, column_scores, exempt_first, sink_mask, sink_scan,
                                    summary_lines)
from headlab.capture import Capture, LayerRecord, activate, attend
from headlab.edits.calibrate import Calibrate, calibrate_pattern
from headlab.heads import HeadRef

BOS, TARGET, N = 1, 7, 64
SINK_HEAD, FIRST_HEAD = HeadRef(0, 1), HeadRef(0, 2)


def planted_model() -> hl.HeadModel:
    """A random 2-layer Llama whose L0H1 attends to token 7 wherever it is and L0H2 to BOS (set by hand).

    Embedding coordinate 0 marks token 7, coordinate 1 is 1 for every token, coordinate 2 marks BOS. Both planted
    heads read the lowest-frequency RoPE pair (dims 7 and 15 of 16: rotation < 0.03 rad over 64 positions), so their
    logits are ~ +15 on the marked keys and exactly 0 elsewhere, at every position.
    """
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, bos_token_id=BOS)
    hf = T.LlamaForCausalLM(cfg).eval()
    d, dim = 16, 7
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, :3] = 0.0
        emb[:, 1] = 1.0
        emb[TARGET, 0] = 8.0
        emb[BOS, 2] = 8.0
        attn = hf.model.layers[0].self_attn
        q, k = attn.q_proj.weight, attn.k_proj.weight
        for head, group, coord in ((SINK_HEAD.head, 0, 0), (FIRST_HEAD.head, 1, 2)):
            q[head * d:(head + 1) * d] = 0.0
            q[head * d + dim, 1] = 2.0
            k[group * d + dim] = 0.0
            k[group * d + dim, coord] = 2.0
        for other in (0, 3):  # the planted k dims must not reach the other head of each KV group
            q[other * d + dim] = 0.0
    return hl.load(hf)


def planted_prompts(positions=(20,), batch=3, seed=0) -> torch.Tensor:
    """`[batch, N]` random ids from 10..100, BOS first, token 7 at `positions`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 101, (batch, N), generator=gen)
    ids[:, 0] = BOS
    ids[:, list(positions)] = TARGET
    return ids


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_planted_sink_heads_are_detected(planted):
    scores = sink_scan(planted, planted_prompts(positions=(12, 28)), SinkParams(), progress=False)
    sinks = scores.items["sink_mask"].bool()  # [B, L, H, S]
    for b in range(3):
        assert sinks[b, 0, SINK_HEAD.head].nonzero().flatten().tolist() == [12, 28]
        assert sinks[b, 0, FIRST_HEAD.head].nonzero().flatten().tolist() == [0]
    col = scores.items["column_score"][:, 0, SINK_HEAD.head]
    assert float(col[:, 12].min()) > 0.5 and float(col[:, 28].min()) > 0.4
    others = [(l, h) for l in range(2) for h in range(4) if (l, h) not in ((0, 1), (0, 2))]
    assert not any(bool(sinks[:, l, h, 1:].any()) for l, h in others)
    assert scores.maps["later_any"][0, 1] == 1.0 and scores.maps["first_sink"][0, 2] == 1.0
    assert scores.maps["sink_share"][0, 1] > 0.75 and scores.maps["sink_share"][0, 2] > 0.9  # L0H1: from query 12 on
    assert scores.meta["sink_tokens"][0]["token"] == f"#{TARGET}"
    assert scores.meta["sink_tokens"][0]["heads"] == 1
    assert scores.meta["sink_tokens"][0]["sunk"] == scores.meta["sink_tokens"][0]["occurrences"] == 6
    assert scores.top(1, map="later_share")[0][0] == SINK_HEAD
    assert any("#7" in line for line in summary_lines(scores))


def test_relative_threshold_and_tail_rule():
    received = torch.tensor([[[10.0, 1.0, 3.0, 1.0, 0.9]]])  # [B=1, H=1, S=5]: causal, 5 queries
    n_visible = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    score = column_scores(received, n_visible)
    assert torch.allclose(score, torch.tensor([[[2.0, 0.25, 1.0, 0.5, 0.9]]]))
    absolute = sink_mask(received, n_visible, SinkRule(tau=0.6, min_visible=1))
    assert absolute[0, 0].tolist() == [True, False, True, False, True]
    tail = sink_mask(received, n_visible, SinkRule(tau=0.6, min_visible=3))
    assert tail[0, 0].tolist() == [True, False, True, False, False]
    excluded = column_scores(received, n_visible, SinkRule(min_visible=3)).isnan()[0, 0]
    assert excluded.tolist() == [False] * 3 + [True] * 2
    relative = sink_mask(received, n_visible, SinkRule(threshold="relative", alpha=2.0, min_visible=1))  # cut 0.4
    assert relative[0, 0].tolist() == [True, False, True, True, True]
    assert exempt_first(absolute)[0, 0].tolist() == [False, False, True, False, True]
    with pytest.raises(ValueError):
        SinkRule(threshold="median")


def test_calibrate_pattern_keeps_rows_and_proportions():
    gen = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, 3, 6, 6, generator=gen).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    sinks = torch.zeros(2, 3, 6, dtype=torch.bool)
    sinks[:, :, 2] = True
    sinks[0, 1, 4] = True
    out = calibrate_pattern(pattern, sinks, 0.4)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, 6))
    assert torch.allclose(out[..., 2][..., 2:], 0.4 * pattern[..., 2][..., 2:])
    rest = ~sinks[:, :, None, :].expand_as(pattern)
    ratio = (out / pattern)[rest & (pattern > 0)].view(-1)  # one factor per row on its non-sink keys
    assert float(ratio.min()) >= 1.0
    assert torch.equal(out[:, :, :2], pattern[:, :, :2])  # rows 0, 1 see no sink: unchanged
    only_sinks = torch.zeros(1, 1, 1, 6)
    only_sinks[..., 2] = 1.0
    assert torch.equal(calibrate_pattern(only_sinks, sinks[:1, :1], 0.4), only_sinks)  # nothing to move it to


def _act_reference(a: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """ACT's code on one causal head `[N, N]`: column sums / (N − j) > τ, first hit exempt, mass to the rest."""
    n = a.shape[0]
    idx = torch.nonzero(a.sum(0) / torch.arange(n, 0, -1) > tau).flatten()[1:]
    out = a.clone()
    moved = a[:, idx].sum(1, keepdim=True) * (1 - beta)
    out[:, idx] *= beta
    rest = a.clone()
    rest[1:, idx] = 0
    out = out + moved * rest / rest.sum(1, keepdim=True)
    out[0, 0] = 1
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibrate_edit_matches_act_code(family):
    from conftest import tiny_config

    cls, cfg = tiny_config(family)
    torch.manual_seed(1)
    model = hl.load(cls(cfg).eval())
    ids = torch.randint(2, 101, (2, 24))
    head = HeadRef(1, 2)
    run = model.run(ids, layers=[1])
    pattern = run.records[1].pattern([head.head])[:, 0]  # [B, Q, S]
    values = run.records[1].v[:, model.kv_group(head)]  # [B, S, D]
    capture = Capture(layers=frozenset([1]), with_z=True)
    edit = Calibrate(heads=[head], beta=0.4, rule=SinkRule(tau=0.06, min_visible=1))
    with hl.edit(model, edit), activate(model.owner, capture=capture), torch.no_grad():
        model.hf(input_ids=ids)
    z = capture.records[1].z[:, :, head.head]  # [B, Q, D]
    for b in range(2):
        expected = _act_reference(pattern[b], 0.4, 0.06)
        assert torch.allclose(expected.sum(-1), torch.ones(24), atol=1e-6)
        assert (expected @ values[b] - z[b]).abs().max() < 1e-5
    assert not torch.allclose(z, (pattern @ values).float(), atol=1e-4)  # the edit did something


def test_calibrate_is_scoped_padding_safe_and_prefill_only(planted):
    ids = planted_prompts(positions=(12, 28), batch=2)  # the first sink (12) is exempt, 28 is calibrated
    before = planted.forward(ids).logits
    edit = Calibrate(heads=[SINK_HEAD, HeadRef(1, 0)], beta=0.0, rule=SinkRule(min_visible=8))
    with hl.edit(planted, edit):
        calibrated = planted.forward(ids).logits
        short = planted.forward(ids[1:, :40]).logits
        padded = planted.forward([ids[0].tolist(), ids[1, :40].tolist()]).logits
    assert torch.equal(planted.forward(ids).logits, before)
    assert (calibrated - before).abs().max() > 1e-5
    assert (padded[1, :40] - short[0]).abs().max() < 1e-4  # padding queries add nothing to the column scores
    assert (padded[0] - calibrated[0]).abs().max() < 1e-4

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, t, 16, generator=gen) for n, t in ((4, 1), (2, 9), (2, 9)))
    record = LayerRecord(layer=0, q=q, k=k, v=v, mask=None, causal=True, scale=0.25)  # one decode step
    out, _ = edit.override(record, (1,))
    assert torch.equal(out, attend(record, (1,))[0])


def test_calibrate_fixed_positions_and_errors(planted):
    ids = planted_prompts(positions=(20,), batch=1)
    run = planted.run(ids, layers=[0])
    pattern = run.records[0].pattern([SINK_HEAD.head])
    fixed = Calibrate(heads=[SINK_HEAD], beta=0.5, positions=(20,))
    sinks = fixed.sinks(pattern, run.records[0].visible())
    assert sinks.flatten().nonzero().flatten().tolist() == [20]
    found = Calibrate(heads=[SINK_HEAD], rule=SinkRule(min_visible=8), first_exempt=False)
    assert found.sinks(pattern, run.records[0].visible())[0, 0].nonzero().flatten().tolist() == [20]
    with pytest.raises(hl.EditError):
        Calibrate(heads=[SINK_HEAD], beta=1.5)
    with pytest.raises(hl.HeadIndexError):
        with hl.edit(planted, Calibrate(heads=[HeadRef(5, 0)])):
            pass
