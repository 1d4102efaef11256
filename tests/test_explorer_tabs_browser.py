"""The explorer's Sinks, Retrieval and Linear-vs-softmax tabs in headless Chromium on smollm2-135m: run the small live
version, apply its edit, see the numbers change to the library's. Screenshots and each tab's time to first render
(click → output shown) go to test-artifacts/explorer/.

Uses Debian's /usr/bin/chromium through PyPI playwright; skips without it."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import headlab as hl
from headlab.edits.calibrate import Calibrate
from headlab.explore import Explorer, ExplorerSettings, load_app_module
from headlab.explore.sinks import rule_for
from headlab.heads import HeadRef
from test_explorer_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                                   reason=f"no Chromium at {CHROMIUM} (apt install chromium)")]
MODEL = "smollm2-135m"
PROMPT = "The cat sat on the mat. The dog ran in the park. The cat sat on the mat, and then the dog"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def page():
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    from playwright.sync_api import expect, sync_playwright

    explorer = Explorer(ExplorerSettings(max_tokens=1024))
    app = load_app_module()
    demo = app.build_app(explorer, model=MODEL)
    url = app.launch(demo, port=_free_port(), block=False)
    expect.set_options(timeout=TIMEOUT * 4)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()
        pg.set_default_timeout(TIMEOUT * 4)
        pg.goto(url)
        expect(pg.locator("#status")).to_contain_text("Loaded")
        pg.fill("#prompt textarea", PROMPT)
        pg.click("#analyse")
        expect(pg.locator("#status")).to_contain_text("Analysed")
        yield pg, explorer
        browser.close()
    demo.close()
    (ARTIFACTS / "tab_timings.json").write_text(json.dumps(TIMINGS, indent=1))


def _timed(name: str, action, wait) -> None:
    t0 = time.perf_counter()
    action()
    wait()
    TIMINGS[name] = round(time.perf_counter() - t0, 2)


def test_sinks_tab_scans_and_calibrates(page):
    from playwright.sync_api import expect

    pg, explorer = page
    model = explorer.cache.get(MODEL)
    pg.get_by_role("tab", name="Sinks").click()
    _timed("sinks: scan", lambda: pg.click("#sink-scan"),
           lambda: expect(pg.locator("#sink-status")).to_contain_text("Scanned"))
    pg.wait_for_selector("#sink-column .js-plotly-plot")
    expect(pg.locator("#sink-tokens")).to_contain_text("First-token sink")
    heads = pg.locator("#calib-heads textarea").input_value()
    assert heads  # filled with the suggested heads
    _timed("sinks: calibrate", lambda: pg.click("#calib-apply"),
           lambda: expect(pg.locator("#calib-info")).to_contain_text("ACT calibration"))
    ids = model.encode(PROMPT, prepend_bos=True).input_ids
    refs = tuple(HeadRef.parse(h) for h in heads.split(", "))
    with hl.edit(model, Calibrate(heads=refs, beta=0.4, rule=rule_for(8))):
        edited = float(model.loss(ids))
    expect(pg.locator("#calib-info")).to_contain_text(f"{edited:.4f}")
    pg.screenshot(path=ARTIFACTS / "13-sinks-tab.png", full_page=True)
    pg.locator("#calib-on input[type=checkbox]").uncheck()
    expect(pg.locator("#calib-info")).to_contain_text("calibration off")
    expect(pg.locator("#calib-info")).to_contain_text(f"{float(model.loss(ids)):.4f}")


def test_retrieval_tab_decodes_masks_and_compresses(page):
    from playwright.sync_api import expect

    pg, _ = page
    pg.get_by_role("tab", name="Retrieval").click()
    pg.locator("#needle-length input[type=number]").fill("256")
    pg.locator("#needle-length input[type=number]").press("Enter")
    _timed("retrieval: first stage shown", lambda: pg.click("#needle-run"),
           lambda: expect(pg.locator("#needle-status")).to_contain_text("needle prompt"))
    t0 = time.perf_counter()
    expect(pg.locator("#needle-status")).to_contain_text("Decoded 5 conditions", timeout=180_000)
    TIMINGS["retrieval: all five decodes (256 tokens)"] = round(time.perf_counter() - t0, 2)
    table = pg.locator("#needle-table")
    for name in ("baseline", "top10-uniform", "random10-uniform", "razor-w64", "window-w64"):
        expect(table).to_contain_text(name)
    pg.wait_for_selector("#needle-grid .js-plotly-plot")
    pg.screenshot(path=ARTIFACTS / "14-retrieval-tab.png", full_page=True)
    pg.click("#needle-run")  # again, cancelled mid-way: the status says so and no later stage overwrites it
    expect(pg.locator("#needle-status")).to_contain_text("Decoding")
    pg.click("#needle-cancel")
    expect(pg.locator("#needle-status")).to_contain_text("Cancelled")
    pg.wait_for_timeout(3000)
    expect(pg.locator("#needle-status")).to_contain_text("Cancelled")


def test_kinds_tab_shows_two_twins_and_zeroes_the_head(page):
    from playwright.sync_api import expect

    pg, _ = page
    pg.get_by_role("tab", name="Linear vs softmax").click()
    _timed("linear vs softmax: compare", lambda: pg.click("#twin-run"),
           lambda: expect(pg.locator("#twin-right-info")).to_contain_text("gla"))
    pg.wait_for_selector("#twin-left-plot .js-plotly-plot")
    pg.wait_for_selector("#twin-right-plot .js-plotly-plot")
    text = pg.locator("#twin-text textarea").input_value()
    model = hl.load("twin-text-gla")
    ids = model.encode(text).input_ids
    expect(pg.locator("#twin-right-info")).to_contain_text(f"{float(model.loss(ids)):.4f}")
    pg.locator("#twin-zero input[type=checkbox]").check()
    with hl.edit(model, hl.Ablate(HeadRef(1, 0), how="zero")):
        zeroed = float(model.loss(ids))
    expect(pg.locator("#twin-right-info")).to_contain_text(f"zeroed: loss {zeroed:.4f}")
    pg.screenshot(path=ARTIFACTS / "15-kinds-tab.png", full_page=True)
    assert torch.isfinite(torch.tensor(zeroed))
