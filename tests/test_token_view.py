"""The token view and the layer × head grid as HTML (headlab.viz.html): the payload carries the run's own numbers.

Compared: dense payload weights against `run.pattern()` (to the 4-decimal rounding), on the toy induction model, on a
padded batch item and on a DeltaNet twin (signed weights); statistics payloads against `m.stats(...)`'s HeadStats and
against the full pattern they summarise; the grid against the HeadScores map; hostile token strings round-trip
through the escaping without adding a tag. Browser behaviour is in test_token_view_browser.py.
"""

from __future__ import annotations

import math
from html.parser import HTMLParser

import pytest
import torch

import headlab as hl
from headlab.errors import HeadIndexError, HeadlabError
from headlab.explore import Explorer, ExplorerSettings
from headlab.explore.tokens import token_view_html
from headlab.viz.html import (
    SCALE, ViewError, ViewTooLarge, grid_view, read_payload, token_stats_view, token_view,
)

PROMPT = [0] + [9, 41, 3, 77, 12, 56, 90, 23] * 3  # [BOS] r r r: 25 tokens
HOSTILE = ["</script><script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "&amp; &lt;", "\u2028x\u2029",
           "'single' `tick` ${x} {{y}}", "\n\t", "<!--", "]]>"]


@pytest.fixture(scope="module")
def toy():
    return hl.load("toy-induction", device="cpu")


@pytest.fixture(scope="module")
def run(toy):
    return toy.run(PROMPT, layers=[0, 1])


def dense_weights(payload) -> torch.Tensor:
    """The payload's rows [H, Q, S] back as floats (trimmed rows padded with zeros)."""
    n_s = len(payload["tokens"])
    out = torch.zeros(len(payload["labels"]), n_s - payload["q_offset"], n_s)
    for h, rows in enumerate(payload["rows"]):
        for q, row in enumerate(rows):
            out[h, q, : len(row)] = torch.tensor(row, dtype=torch.float32) / payload["scale"]
    return out


def test_dense_payload_equals_the_runs_patterns(run, toy):
    view = run.token_view(layer=1)
    payload = read_payload(view.html)
    assert payload["kind"] == "tokens" and payload["labels"] == [f"L1H{h}" for h in range(toy.n_heads)]
    assert payload["tokens"] == run.tokens() and payload["scale"] == SCALE == 10_000
    expected = run.patterns(1)[0]
    assert (dense_weights(payload) - expected).abs().max() <= 0.5 / SCALE + 1e-7
    assert not payload["signed"]
    # causal rows are cut after their last nonzero: row q holds at most q + 1 keys
    assert all(len(row) <= q + 1 for rows in payload["rows"] for q, row in enumerate(rows))
    # the other entry points give the same numbers
    assert read_payload(hl.viz.html.token_view(run.tokens(), expected, payload["labels"]).html)["rows"] == \
        payload["rows"]
    assert read_payload(run.token_view(heads=["L1H2"]).html)["rows"] == [payload["rows"][2]]


def test_padded_batch_item_shows_only_its_tokens(toy):
    run = toy.run([PROMPT, PROMPT[:11]], heads=[hl.HeadRef(1, 0)])
    payload = read_payload(run.token_view(index=1).html)
    assert payload["tokens"] == run.tokens(1) and len(payload["tokens"]) == 11
    expected = run.pattern(hl.HeadRef(1, 0))[1, :11, :11]
    assert (dense_weights(payload)[0] - expected).abs().max() <= 0.5 / SCALE + 1e-7
    with pytest.raises(HeadIndexError, match="batch item 2"):
        run.token_view(index=2)


def test_signed_patterns_of_a_deltanet_twin():
    m = hl.load("twin-recall-deltanet", device="cpu")
    run = m.run(list(range(1, 40)), layers=[1])
    payload = read_payload(run.token_view().html)
    expected = run.patterns(1)[0]
    assert bool((expected < 0).any()) and payload["signed"]
    assert (dense_weights(payload) - expected).abs().max() <= 0.5 / SCALE + 1e-7


def test_default_heads_of_repr_html(toy, run):
    assert read_payload(run._repr_html_())["labels"] == [f"L0H{h}" for h in range(toy.n_heads)]  # first layer
    asked = toy.run(PROMPT, heads=["L1H2", "L0H1"])
    assert read_payload(asked._repr_html_())["labels"] == ["L0H1", "L1H2"]  # the heads the run was asked for
    only0 = toy.run(PROMPT, layers=[0])
    with pytest.raises(HeadIndexError, match=r"layer\(s\) \[1\] are not in this run"):
        only0.token_view(layer=1)
    with pytest.raises(HeadIndexError, match="out of range"):
        run.token_view(heads=["L5H0"])
    with pytest.raises(HeadIndexError, match="need a layer"):
        run.token_view(heads=[0, 1])
    assert read_payload(run.token_view(layer=1, heads=[0, 3]).html)["labels"] == ["L1H0", "L1H3"]


def test_stats_view_equals_stats_run_values(toy):
    ids = [0] + [(7 * i) % 127 + 1 for i in range(200)]
    st = toy.stats(ids, layers=[1], topk=8)
    payload = read_payload(st.token_view().html)
    assert payload["kind"] == "stats" and payload["k"] == 8 and len(payload["tokens"]) == 201
    hs = st.layers[1]
    for h in range(toy.n_heads):
        assert payload["entropy"][h] == [round(float(x), 4) for x in hs.entropy[0, h]]
        assert payload["received"][h] == [round(float(x), 4) for x in hs.received[0, h]]
        for q in (0, 57, 200):
            keep = hs.topk_idx[0, h, q] >= 0
            assert payload["topk_idx"][h][q] == hs.topk_idx[0, h, q][keep].tolist()
            assert payload["topk_w"][h][q] == torch.round(hs.topk_weight[0, h, q][keep] * SCALE).long().tolist()
    assert payload["n_visible"] == [int(x) for x in hs.n_visible[0]]
    # and the statistics are those of the full pattern (the T x T matrix the view never sends)
    full = toy.run(ids, layers=[1]).patterns(1)[0]  # [H, T, T]
    assert torch.allclose(torch.tensor(payload["received"]), full.sum(1), atol=1e-3)
    top = full.topk(8, dim=-1)
    assert torch.allclose(torch.tensor([[r[0] for r in rows] for rows in payload["topk_w"]]) / SCALE,
                          top.values[..., 0], atol=0.5 / SCALE + 1e-6)


def test_auto_switches_to_statistics_over_the_budget(run, toy):
    dense = run.token_view(layer=1)
    small = run.token_view(layer=1, max_bytes=dense.nbytes // 4)
    payload = read_payload(small.html)
    assert payload["kind"] == "stats" and "over the dense view's budget" in payload["note"]
    st = toy.stats(PROMPT, layers=[1], topk=8)
    assert read_payload(st.token_view().html)["topk_w"] == payload["topk_w"]  # the same statistics as m.stats
    with pytest.raises(ViewTooLarge, match="over the view's budget"):
        run.token_view(layer=1, mode="dense", max_bytes=dense.nbytes // 4)
    assert isinstance(ViewTooLarge("x"), HeadlabError)


def test_lse_only_stats_are_refused_clearly(toy):
    st = toy.stats(PROMPT, layers=[1], statistics="lse")
    assert st.paths[1] == "fused-lse"  # the CPU flash route applies to the toy's sdpa layers
    with pytest.raises(ViewError, match="topk=8"):
        st.token_view()
    assert "no token view" in st._repr_html_()


def test_hostile_tokens_are_escaped():
    weights = torch.softmax(torch.randn(2, len(HOSTILE), len(HOSTILE)), -1)
    view = token_view(HOSTILE, weights, ["L0H0", '<b id="x">'], title="<script>t</script>", note="&")
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Tags().feed(view.html)
    assert [t for t, _ in tags] == ["div", "script"]  # nothing from the tokens became a tag
    payload = read_payload(view.html)
    assert payload["tokens"] == HOSTILE and payload["labels"][1] == '<b id="x">'
    assert payload["title"] == "<script>t</script>"
    assert "</script><script>alert" not in view.html.split("<script>", 1)[0]
    for page in (view.document(), view.markup()):
        assert read_payload(page)["tokens"] == HOSTILE
    stats = token_stats_view(HOSTILE, entropy=torch.ones(1, 8), received=torch.ones(1, 8), n_visible=torch.ones(8),
                             topk_idx=torch.zeros(1, 8, 2, dtype=torch.long), topk_weight=torch.ones(1, 8, 2))
    assert read_payload(stats.html)["tokens"] == HOSTILE


def test_grid_of_head_scores(toy):
    scores = hl.scan.induction(toy, hl.analyses.InductionParams(batch=2, seq_len=20), progress=False)
    payload = read_payload(scores._repr_html_())
    assert payload["kind"] == "grid" and payload["colorbar"] == scores.primary
    assert payload["values"] == [[round(float(v), 4) for v in row] for row in scores.scores]
    nan = grid_view(torch.tensor([[0.5, math.nan]]))
    assert read_payload(nan.html)["values"] == [[0.5, None]]
    with pytest.raises(HeadlabError, match="no map"):
        scores.grid_view("nope")


def test_bad_shapes_are_clear():
    with pytest.raises(ViewError, match=r"\[H, Q, S\]"):
        token_view(["a"], torch.zeros(1, 1, 1, 1))
    with pytest.raises(ViewError, match="3 tokens for weights over 2"):
        token_view(["a", "b", "c"], torch.zeros(1, 2, 2))
    with pytest.raises(ViewError, match="2 labels for 1 heads"):
        token_view(["a", "b"], torch.zeros(1, 2, 2), ["x", "y"])


def test_view_saves_a_standalone_page(run, tmp_path):
    path = run.token_view(layer=1).save(tmp_path / "view.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "https://" not in page and "http://" not in page
    assert read_payload(page)["rows"] == read_payload(run.token_view(layer=1).html)["rows"]


def test_explorer_token_view_dense_then_statistics(tmp_path):
    small = Explorer(ExplorerSettings(max_tokens=200, token_view_bytes=2_000))
    session = small.analyse("toy-induction", " ".join(map(str, PROMPT)), False, "induction")[3]
    model = small.cache.get("toy-induction")
    head = read_payload(token_view_html(small, session, "L1H2", "head"))  # 25² / 2 cells: under 2 kB
    assert head["kind"] == "tokens" and head["labels"] == ["L1H2"]
    run = model.run(list(session.ids), layers=[1])
    assert (dense_weights(head)[0] - run.pattern(hl.HeadRef(1, 2))[0]).abs().max() <= 0.5 / SCALE + 1e-7
    layer = read_payload(token_view_html(small, session, "L1H2", "layer"))  # 4 heads: over 2 kB
    assert layer["kind"] == "stats" and layer["focus"] == 2 and "statistics view" in layer["note"]
    st = model.stats(list(session.ids), layers=[1], topk=8)
    assert layer["topk_w"] == read_payload(st.token_view().html)["topk_w"]
    with pytest.raises(HeadlabError, match="scope"):
        token_view_html(small, session, "L1H2", "everything")
