"""The explorer's Sinks, Retrieval and Linear-vs-softmax tabs without a browser: each view's numbers against the
library computed independently, and bad input refused with a message."""

from __future__ import annotations

import math

import pytest
import torch

import headlab as hl
from headlab.analyses.razor import Condition, RazorKV, retrieval_kv_heads
from headlab.analyses.retrieval import needle_sets, run_trial, text_prompt
from headlab.analyses.sinks import SinkParams, sink_scan
from headlab.edits.calibrate import Calibrate
from headlab.errors import HeadlabError
from headlab.explore import Explorer, ExplorerSettings
from headlab.explore.kinds import twins_view
from headlab.explore.retrieval import needle_steps, razor_scan, ranked_heads
from headlab.explore.sinks import calibrate_view, rule_for, sinks_view
from headlab.heads import HeadRef
from test_explore import PROMPT, make_text_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(make_text_model(tmp_path_factory.mktemp("tabs_text")))


@pytest.fixture(scope="module")
def explorer():
    return Explorer(ExplorerSettings(max_tokens=400, top_k=5, allow_folders=True))


@pytest.fixture(scope="module")
def session(explorer, folder):
    return explorer.analyse(folder, PROMPT, True, "induction")[3]


def test_sinks_view_is_the_sink_scan_of_the_prompt(explorer, session):
    model = explorer.cache.get(session.model)
    status, grid, column, tokens, suggested = sinks_view(explorer, session, "L1H2", "sink_share", 4)
    ref = sink_scan(model, [list(session.ids)], SinkParams(rule=rule_for(4), n_prompts=1,
                                                            max_tokens=session.n_tokens, prepend_bos=False),
                    progress=False)
    assert torch.allclose(torch.tensor(grid.data[0].z, dtype=torch.float32), ref.maps["sink_share"], atol=1e-6)
    col = ref.items["column_score"][0, 1, 2].nan_to_num(0.0)
    assert torch.allclose(torch.tensor(column.data[0].y, dtype=torch.float32), col, atol=1e-6)
    sinks = ref.items["sink_mask"][0].bool()
    assert f"{int(sinks[..., 0].sum())} of {model.n_layers * model.n_heads} heads" in tokens
    assert "L1H2" in status and suggested and all(HeadRef.parse(h) for h in suggested.split(", "))


def test_calibration_matches_the_edit_computed_directly(explorer, session):
    model = explorer.cache.get(session.model)
    _, body = calibrate_view(explorer, session, "L0H1, L1H3", 0.4, 4)
    ids = torch.tensor([session.ids])
    with hl.edit(model, Calibrate(heads=(HeadRef(0, 1), HeadRef(1, 3)), beta=0.4, rule=rule_for(4))):
        edited = float(model.loss(ids))
    original = float(model.loss(ids))
    assert f"edited **{edited:.4f}**" in body and f"original **{original:.4f}**" in body
    assert not math.isclose(edited, original, abs_tol=1e-5)  # the edit did something on this prompt
    _, off = calibrate_view(explorer, session, "L0H1, L1H3", 0.4, 4, False)
    assert f"edited **{original:.4f}**" in off and "calibration off" in off
    assert float(model.loss(ids)) == original  # the shared model is untouched


@pytest.mark.parametrize("call, message", [
    (lambda ex, s: sinks_view(ex, s, "", "sink_share", 0), "tail rule"),
    (lambda ex, s: sinks_view(ex, s, "", "nope", 8), "unknown sink map"),
    (lambda ex, s: sinks_view(ex, s, "L9H0", "sink_share", 8), "layer 9 is out of range"),
    (lambda ex, s: calibrate_view(ex, s, "L0H0", 1.5, 8), "beta"),
    (lambda ex, s: calibrate_view(ex, s, "", 0.4, 8), "select at least one head"),
    (lambda ex, s: sinks_view(ex, None, "", "sink_share", 8), "nothing analysed"),
    (lambda ex, s: list(needle_steps(ex, s, 0, 10_000, 50, 5, 64)), "haystack length"),  # above the cap
    (lambda ex, s: list(needle_steps(ex, s, 7, 256, 50, 5, 64)), "needle 7"),
    (lambda ex, s: list(needle_steps(ex, s, 0, 256, 50, 0, 64)), "K = 0"),
    (lambda ex, s: twins_view(ex, "twin-text-softmax", "smollm2-135m", "abc", 0, 0), "unknown twin"),
    (lambda ex, s: twins_view(ex, "twin-text-softmax", "twin-text-gla", "x" * 400, 0, 0), "longer than twin-text-softmax.s context"),
    (lambda ex, s: twins_view(ex, "twin-text-softmax", "twin-text-gla", "abc", 5, 0), "layer 5 is out of range"),
])
def test_bad_tab_inputs_get_clear_messages(explorer, session, call, message):
    with pytest.raises(HeadlabError, match=message):
        call(explorer, session)


def test_needle_tab_runs_every_stage_on_a_tiny_model(explorer, session):
    """Mechanics on the word-level toy (it reads the KJV haystack mostly as <unk> and cannot answer): every stage
    yields, the baseline's scores are the harness's own, the final status counts the conditions."""
    model = explorer.cache.get(session.model)
    stages = list(needle_steps(explorer, session, 0, 256, 50, 2, 16))
    assert [s[0].split(" ")[0] for s in stages[:2]] == ["Built", "Decoding"]
    assert stages[-1][0].startswith("Decoded 5 conditions")
    prompt = text_prompt(model, needle_sets()[0], 256, 50)
    base = run_trial(model, prompt, [Condition(name="baseline", score=True)])[0]
    assert torch.equal(torch.tensor(stages[-1][1].data[0].z, dtype=torch.float32), torch.tensor(base["scores"]))
    for name in ("baseline", "top2-uniform", "random2-uniform", "razor-w16", "window-w16"):
        assert f"| {name} |" in stages[-1][2]


def test_twins_view_shows_each_twins_own_pattern(explorer):
    text = "In the beginning God created the heaven"
    status, lfig, lmd, rfig, rmd = twins_view(explorer, "twin-text-softmax", "twin-text-deltanet", text, 1, 2, True)
    for name, fig, md in (("twin-text-softmax", lfig, lmd), ("twin-text-deltanet", rfig, rmd)):
        model = hl.load(name)
        run = model.run(text, heads=[HeadRef(1, 2)])
        pattern = run.pattern(HeadRef(1, 2))[0].float()
        assert torch.allclose(torch.tensor(fig.data[0].z, dtype=torch.float32), pattern, atol=1e-6)
        ids = model.encode(text).input_ids
        with hl.edit(model, hl.Ablate(HeadRef(1, 2), how="zero")):
            zeroed = float(model.loss(ids))
        assert f"loss **{zeroed:.4f}**" in md
    assert "deltanet" in rmd and float(torch.tensor(rfig.data[0].z).min()) < 0  # a signed DeltaNet pattern
    assert rfig.layout.coloraxis is not None or rfig.data[0].zmid == 0.0  # on the diverging scale


@pytest.mark.slow
def test_needle_tab_on_smollm2_masks_and_compresses(explorer):
    sess = explorer.analyse("smollm2-135m", "The cat sat on the mat.", True, "induction")[3]
    model = explorer.cache.get("smollm2-135m")
    stages = list(needle_steps(explorer, sess, 0, 256, 50, 5, 32))
    assert len(stages) >= 6 and stages[-1][0].startswith("Decoded 5 conditions")
    prompt = text_prompt(model, needle_sets()[0], 256, 50)
    base = run_trial(model, prompt, [Condition(name="baseline", score=True)])[0]
    table = stages[-1][2]
    assert f"| baseline | {base['reply'][:90]}" in table.replace("\\|", "|")
    assert torch.allclose(torch.tensor(stages[-1][1].data[0].z, dtype=torch.float32), torch.tensor(base["scores"]))
    razor = razor_scan(model)
    ranked = ranked_heads(torch.tensor(base["scores"]), razor.maps["induction"])
    top = run_trial(model, prompt, [Condition(name="top5-uniform", mask=tuple(ranked[:5]))])[0]
    assert f"| top5-uniform | {top['reply'][:90]}" in table.replace("\\|", "|")
    policy = RazorKV(full=retrieval_kv_heads(razor), sinks=4, window=32, compress_at=len(prompt.ids) - 1)
    razor_rec = run_trial(model, prompt, [Condition(name="razor-w32", kv_policy=RazorKV(
        full=retrieval_kv_heads(razor), sinks=4, window=32))])[0]
    kept = policy.cache_fraction(model, len(prompt.ids) + len(razor_rec["generated"]))["fraction"]
    assert f"| {kept:.1%} |" in table
