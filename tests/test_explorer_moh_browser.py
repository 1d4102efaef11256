"""The explorer's MoH routing tab in headless Chromium: the analysed prompt is routed, the gates of a layer shown, and
the predictions with the MoH edit toggled on and off (numbers equal the library's).

Uses Debian's /usr/bin/chromium through PyPI playwright; skips without it. Screenshots go to
test-artifacts/explorer/."""

from __future__ import annotations

import os

import pytest

import headlab as hl
from headlab.explore import Explorer, ExplorerSettings, ModelCache, _load, load_app_module
from test_explore import PROMPT, make_text_model
from test_explorer_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT, _free_port

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    text_model = str(make_text_model(tmp_path_factory.mktemp("moh_browser_model")))
    cache = ModelCache(_load, allowed=(text_model,), allow_folders=False)
    explorer = Explorer(ExplorerSettings(max_tokens=200, window=24), cache=cache)
    app = load_app_module()
    demo = app.build_app(explorer, model=text_model)
    url = app.launch(demo, port=_free_port(), block=False)
    yield url, explorer, text_model
    demo.close()


def test_moh_tab_routes_and_toggles_the_edit(served):
    from playwright.sync_api import expect, sync_playwright

    url, explorer, name = served
    model = explorer.cache.get(name)
    expect.set_options(timeout=TIMEOUT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1500}).new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("Loaded")  # the page's own first analysis is done
        page.fill("#prompt textarea", PROMPT)
        page.click("#analyse")
        expect(page.locator("#status")).to_contain_text("Analysed")
        page.get_by_role("tab", name="MoH routing").click()
        page.click("#moh-route")
        expect(page.locator("#moh-status")).to_contain_text("showing layer 0")
        page.wait_for_selector("#moh-plot .js-plotly-plot")
        ids = model.encode(PROMPT, prepend_bos=True).input_ids
        with hl.edit(model, hl.MoH(active=0.5)):
            edited = model.loss(ids).item()
        expect(page.locator("#moh-info")).to_contain_text(f"{edited:.4f}")
        expect(page.locator("#moh-info")).to_contain_text("75.0% of (token, head) pairs")
        page.screenshot(path=ARTIFACTS / "12-moh-tab.png", full_page=True)
        page.locator("#moh-on input[type=checkbox]").uncheck()  # the edit off: the original beside itself
        expect(page.locator("#moh-info")).to_contain_text("MoH off (original)")
        original = model.loss(ids).item()
        expect(page.locator("#moh-info")).to_contain_text(f"edited **{original:.4f}**".replace("**", ""))
        browser.close()
