"""The explorer's Circuit tab in headless Chromium: a circuit discovered on the planted induction model is shown as a
graph, a head's pattern on a task prompt, and the head patched live (numbers equal the library's).

Uses Debian's /usr/bin/chromium through PyPI playwright; skips without it. Screenshots go to
test-artifacts/explorer/."""

from __future__ import annotations

import os

import pytest

from headlab.circuits import DiscoverParams, discover
from headlab.circuits.planted import planted_induction_model, planted_induction_task
from headlab.circuits.view import CircuitView
from headlab.explore import Explorer, ExplorerSettings, ModelCache, _load, load_app_module
from test_explore import make_text_model
from test_explorer_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT, _free_port

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    planted = planted_induction_model()
    folder = tmp_path_factory.mktemp("circuit")
    discover(planted, planted_induction_task(8), params=DiscoverParams(n=8, fraction=0.5, edge_prompts=8), out=folder,
             progress=False)
    text_model = str(make_text_model(tmp_path_factory.mktemp("browser_model")))
    cache = ModelCache(lambda name: planted if name == planted.name else _load(name),
                       allowed=(planted.name, text_model), allow_folders=False)
    explorer = Explorer(ExplorerSettings(max_tokens=200, window=24), cache=cache)
    view = CircuitView.open(folder, cache.get)
    app = load_app_module()
    demo = app.build_app(explorer, model=text_model, circuit=view)
    url = app.launch(demo, port=_free_port(), block=False)
    yield url, view
    demo.close()


def test_circuit_tab_graph_pattern_and_live_patch(served):
    from playwright.sync_api import expect, sync_playwright

    url, view = served
    expect.set_options(timeout=TIMEOUT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1500}).new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        page.get_by_role("tab", name="Circuit").click()
        expect(page.locator("#circuit-summary")).to_contain_text("planted_induction")
        expect(page.locator("#circuit-summary")).to_contain_text("previous-token")
        page.wait_for_selector("#circuit-graph .js-plotly-plot")
        page.click("#circuit-show")
        expect(page.locator("#circuit-prompt-text")).to_contain_text("L1H0: mover")
        page.wait_for_selector("#circuit-pattern .js-plotly-plot")
        page.click("#circuit-patch")
        expect(page.locator("#circuit-result")).to_contain_text("patched from corrupted")
        shown = page.inner_text("#circuit-result")
        lib = view.patch("L1H0", 0)
        for line in lib.splitlines()[2:]:  # each row's logit difference as the library computes it
            assert line.split("|")[2].strip() in shown
        page.screenshot(path=ARTIFACTS / "10-circuit-tab.png", full_page=True)
        # click the node of L0H0 (layer 0 at the bottom, head 0): it fills the head box and shows that head
        point = page.evaluate(
            "() => { const p = document.querySelector('#circuit-graph .js-plotly-plot');"
            " const tr = p._fullData.findIndex(t => t.mode === 'markers+text' && t.text.includes('L0H0'));"
            " const i = p._fullData[tr].text.indexOf('L0H0');"
            " const xa = p._fullLayout.xaxis, ya = p._fullLayout.yaxis, r = p.getBoundingClientRect();"
            " return [r.left + xa._offset + xa.l2p(p._fullData[tr].x[i]),"
            "         r.top + ya._offset + ya.l2p(p._fullData[tr].y[i])]; }")
        page.mouse.click(point[0] + 12, point[1])  # on the node, beside the edge line through its centre
        expect(page.locator("#circuit-head-box textarea")).to_have_value("L0H0")
        expect(page.locator("#circuit-prompt-text")).to_contain_text("L0H0: previous-token")
        page.screenshot(path=ARTIFACTS / "11-circuit-node-clicked.png", full_page=True)
        page.fill("#circuit-prompt input", "99")
        page.click("#circuit-patch")
        expect(page.locator("#circuit-result")).to_contain_text("out of range")
        browser.close()
