"""The explorer's Reports, Pruning and ICL tabs in headless Chromium, on folders written by the real commands: a report
picked from the list shows its top heads; the Pruning tab's fraction slider applies the prune run's mask (the numbers
equal the library's); the ICL tab's step slider moves the KQ/OV heatmap to another saved checkpoint.

Uses Debian's /usr/bin/chromium through PyPI playwright; skips without it. Screenshots go to test-artifacts/explorer/."""

from __future__ import annotations

import json
import os
import re

import pytest

import headlab as hl
from headlab.cli import main
from headlab.explore import Explorer, ExplorerSettings, ModelCache, _load, load_app_module
from headlab.explore.reports import ReportLibrary
from headlab.results import HeadScores
from test_explore import PROMPT, make_text_model
from test_explorer_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT, _free_port

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    root = tmp_path_factory.mktemp("reports_browser")
    model = str(make_text_model(root / "model"))
    text = root / "text.txt"
    text.write_text(" ".join([PROMPT + " ."] * 40))
    runs = root / "runs"
    for argv in (["scan", "induction", "--model", model, "--out", str(runs / "induction"), "--seq-len", "8",
                  "--batch", "2"],
                 ["prune", "--model", model, "--out", str(runs / "prune"), "--rank-by", "random,induction",
                  "--fractions", "0,0.25,0.5", "--eval", f"ppl:{text}", "--ctx", "16", "--windows", "1",
                  "--scan-seq-len", "8", "--scan-batch", "2", "--no-progress"],
                 ["icl", "train", "--out", str(runs / "icl"), "--steps", "60", "--checkpoint-every", "20", "--batch",
                  "64", "--no-progress"]):
        assert main(argv) == 0
    cache = ModelCache(_load, allowed=(model,), allow_folders=False)
    explorer = Explorer(ExplorerSettings(max_tokens=200, window=24), cache=cache)
    library = ReportLibrary([runs / "prune", runs / "icl"], roots=[runs])
    app = load_app_module()
    demo = app.build_app(explorer, model=model, reports=library)
    url = app.launch(demo, port=_free_port(), block=False)
    yield url, explorer, model, runs
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _page(browser, url):
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    expect(page.locator("#status")).to_contain_text("Loaded")  # the page's own first analysis is done
    return page


def _set_slider(page, elem_id: str, value) -> None:
    """Type a value into a Gradio slider's number box and leave it (its blur is the slider's release)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def test_reports_tab_opens_a_picked_report_with_its_top_heads(served, browser):
    from playwright.sync_api import expect

    url, _, _, runs = served
    page = _page(browser, url)
    page.get_by_role("tab", name="Reports").click()
    expect(page.locator("#report-status")).to_contain_text("Opened the prune report")  # the first --report
    page.locator("#report-picker input").click()
    page.get_by_role("option", name="induction · runs/induction").click()
    expect(page.locator("#report-status")).to_contain_text("Opened the induction report")
    scores = HeadScores.load(runs / "induction")
    for name in ("induction", "prev_token"):
        head, value = scores.top(1, map=name)[0]
        row = re.compile(rf"{name}\s*{head}\s*{value:.4g}")  # a table row's cells
        expect(page.locator("#report-info")).to_contain_text(row)
    expect(page.locator("#report-info")).to_contain_text(re.compile(r"params\.seq_len\s*8"))
    page.wait_for_selector("#report-plot .js-plotly-plot")
    expect(page.locator("#report-plot")).to_contain_text("induction: induction")
    page.locator("#report-figure input").click()
    page.get_by_role("option", name="heatmap prev_token").click()
    expect(page.locator("#report-plot")).to_contain_text("induction: prev_token")
    page.screenshot(path=ARTIFACTS / "20-reports-tab.png", full_page=True)
    page.context.close()


def test_pruning_slider_applies_the_runs_mask(served, browser):
    from playwright.sync_api import expect

    url, explorer, name, runs = served
    model = explorer.cache.get(name)
    page = _page(browser, url)
    page.fill("#prompt textarea", PROMPT)
    page.click("#analyse")
    expect(page.locator("#status")).to_contain_text("Analysed")
    page.get_by_role("tab", name="Pruning").click()
    expect(page.locator("#prune-status")).to_contain_text("Opened the pruning run prune")
    page.wait_for_selector("#prune-curves .js-plotly-plot")
    rows = [json.loads(line) for line in (runs / "prune" / "results.jsonl").read_text().splitlines()]
    ids = model.encode(PROMPT, prepend_bos=True).input_ids
    for fraction in (0.25, 0.5):
        _set_slider(page, "prune-fraction", fraction)
        row = next(r for r in rows if r["ranker"] == "random" and r["fraction"] == fraction)
        with hl.edit(model, hl.ablate(hl.as_heads(row["removed"]))):  # the heads the run itself removed
            edited = model.loss(ids).item()
        expect(page.locator("#prune-comparison")).to_contain_text(f"{len(row['removed'])} of 8 heads")
        expect(page.locator("#prune-comparison")).to_contain_text(f"edited {edited:.4f}")
        expect(page.locator("#prune-comparison")).to_contain_text(f"{row['value']:.4f}")  # the run's recorded row
        page.screenshot(path=ARTIFACTS / f"21-pruning-{fraction:g}.png", full_page=True)
    page.locator("#prune-ranker").get_by_label("induction", exact=True).check()
    expect(page.locator("#prune-status")).to_contain_text("Applied the induction mask at 0.5")
    page.click("#prune-remeasure")
    row = next(r for r in rows if r["ranker"] == "induction" and r["fraction"] == 0.5)
    expect(page.locator("#prune-remeasured")).to_contain_text(f"the run recorded: ppl {row['value']:.4f}")
    page.context.close()


def test_icl_step_slider_moves_the_heatmap(served, browser):
    from playwright.sync_api import expect

    url, _, _, _ = served
    page = _page(browser, url)
    page.get_by_role("tab", name="ICL").click()
    expect(page.locator("#icl-status")).to_contain_text("Step 60")
    page.wait_for_selector("#icl-weights .js-plotly-plot")
    expect(page.locator("#icl-weights")).to_contain_text("at step 60 (checkpoint 4 of 4)")
    page.wait_for_selector("#icl-curves .js-plotly-plot")
    page.screenshot(path=ARTIFACTS / "22-icl-step-60.png", full_page=True)
    _set_slider(page, "icl-step", 25)
    expect(page.locator("#icl-weights")).to_contain_text("at step 20 (checkpoint 2 of 4)")
    expect(page.locator("#icl-status")).to_contain_text("Step 20")
    expect(page.locator("#icl-step input[type=number]")).to_have_value("20")  # snapped to the checkpoint
    page.screenshot(path=ARTIFACTS / "23-icl-step-20.png", full_page=True)
    page.context.close()
