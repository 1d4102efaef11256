"""The head explorer driven end to end in headless Chromium: prompt, click a head, edit, bad input, two sessions.

Uses Debian's /usr/bin/chromium through PyPI playwright (never `playwright install`); skips
without it. The model is data/toy-induction when it has been trained, else a tiny random
GPT-2 with a word-level tokenizer. Screenshots go to test-artifacts/explorer/.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import pytest

from headlab.capture import active_ops
from headlab.explore import Explorer, ExplorerSettings, load_app_module
from headlab.models.toy import TOY_INDUCTION_DIR
from test_explore import PROMPT, leaked_body, make_text_model  # tests/ is on sys.path under pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "explorer"
TIMEOUT = 30_000  # ms for any one UI update
NUMBERS = re.compile(r"[-+]?\d+\.\d{4}")  # every probability and loss the comparison shows, to 4 decimals

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, explorer, model name, prompt): the real app on a free localhost port, in this process."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")
    if (TOY_INDUCTION_DIR / "config.json").exists():
        name, prompt = "toy-induction", "0 " + " ".join(map(str, [9, 41, 3, 77, 12, 56, 90, 23] * 3))  # 25 tokens
    else:
        name, prompt = str(make_text_model(tmp_path_factory.mktemp("browser_model"))), PROMPT + " mat ."
    explorer = Explorer(ExplorerSettings(max_tokens=200, window=24, allow_folders=True))
    app = load_app_module()
    demo = app.build_app(explorer, model=name)
    url = app.launch(demo, port=_free_port(), block=False)
    assert url.startswith("http://127.0.0.1:")
    yield url, explorer, name, prompt
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _open(browser, url):
    """A fresh page in its own context (its own Gradio session), rendered once."""
    page = browser.new_context(viewport={"width": 1400, "height": 1700}).new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#score-grid .js-plotly-plot")
    page.wait_for_selector("#pattern .js-plotly-plot")
    return page


def _analyse(page, prompt, n):
    """Analyse a prompt of n tokens (not the length of the page's first prompt) and wait for its head view."""
    from playwright.sync_api import expect

    page.fill("#prompt textarea", prompt)
    page.click("#analyse")
    expect(page.locator("#status")).to_contain_text(re.compile(f"Analysed {n} tokens with .*; showing"))


def _apply(page, heads, how, factor=None):
    page.fill("#edit-heads textarea", heads)
    page.locator("#how label", has_text=how).click()
    if factor is not None:
        page.fill("#factor input", str(factor))
    page.click("#apply-edit")


def _numbers(text):
    """The comparison's probabilities (original, edited per rank), then loss original, edited and change."""
    numbers = NUMBERS.findall(text)
    assert len(numbers) >= 5, text
    return numbers


def test_prompt_click_head_and_edit(served, browser):
    from playwright.sync_api import expect

    url, explorer, name, prompt = served
    page = _open(browser, url)
    n = len(explorer.analyse(name, prompt, True, "induction")[3].ids)
    _analyse(page, prompt, n)
    page.screenshot(path=ARTIFACTS / "01-analysed.png", full_page=True)

    # click the grid cell of L1H2: plotly's drag layer spans the plot area; layer 0 is the top row
    left, top, width, height = page.evaluate(
        "() => { const r = document.querySelector('#score-grid .nsewdrag').getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height]; }")
    model = explorer.cache.get(name)
    page.mouse.click(left + 2.5 / model.n_heads * width, top + 1.5 / model.n_layers * height)
    expect(page.locator("#head-box textarea")).to_have_value("L1H2")
    expect(page.locator("#head-info")).to_contain_text("L1H2:")
    expect(page.locator("#pattern")).to_contain_text(f"L1H2 — positions {max(0, n - 24)}..{n - 1} of {n}")
    page.screenshot(path=ARTIFACTS / "02-head-clicked.png", full_page=True)

    page.click("#add-head")
    expect(page.locator("#edit-heads textarea")).to_have_value("L1H2")
    page.click("#apply-edit")
    expect(page.locator("#comparison")).to_contain_text("zero L1H2")
    shown = _numbers(page.inner_text("#comparison"))
    session = explorer.analyse(name, prompt, True, "induction")[3]
    assert shown == _numbers(explorer.apply_edit(session, "L1H2", "zero", None)[1])
    assert shown[-3] != shown[-2]  # the edit changed the loss shown
    page.screenshot(path=ARTIFACTS / "03-edited.png", full_page=True)

    for action, message in [(lambda: _apply(page, "L9H9", "zero"), "out of range"),
                            (lambda: _apply(page, "L1H2", "scale", ""), "finite factor"),
                            (lambda: _analyse_empty(page), "empty prompt")]:
        action()
        expect(page.locator("#status")).to_contain_text(message)
    page.fill("#model input", "no-such-model")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("unknown model 'no-such-model'")
    page.screenshot(path=ARTIFACTS / "04-bad-model.png", full_page=True)
    page.context.close()


def _analyse_empty(page):
    page.fill("#prompt textarea", "")
    page.click("#analyse")


def test_two_sessions_edit_at_the_same_moment(served, browser):
    """Pages A and B apply different edits whose forwards a barrier forces to overlap in the server."""
    from playwright.sync_api import expect

    url, explorer, name, prompt = served
    pages = {"A": _open(browser, url), "B": _open(browser, url)}
    session = explorer.analyse(name, prompt, True, "induction")[3]
    for page in pages.values():
        _analyse(page, prompt, session.n_tokens)
    edits = {"A": ("L1H0", "zero", None, "zero L1H0"), "B": ("L0H2", "scale", 3, "scale ×3 L0H2")}
    expected = {key: _numbers(explorer.apply_edit(session, heads, how, factor)[1])
                for key, (heads, how, factor, _) in edits.items()}
    assert len({tuple(v) for v in [*expected.values(), _numbers(leaked_body(explorer, session))]}) == 3

    model = explorer.cache.get(name)
    barrier = threading.Barrier(2, timeout=20)

    def hold(*_):
        barrier.wait()  # both sessions are inside their own edit scope, mid-forward, at once

    handle = model.attention_module(1).register_forward_pre_hook(hold)
    try:
        for key, (heads, how, factor, _) in edits.items():
            _apply(pages[key], heads, how, factor)
        for key, (*_, label) in edits.items():
            expect(pages[key].locator("#comparison")).to_contain_text(label)
    finally:
        handle.remove()
    for key, page in pages.items():
        assert _numbers(page.inner_text("#comparison")) == expected[key]
        page.screenshot(path=ARTIFACTS / f"05-session-{key}.png", full_page=True)
        page.context.close()
    assert active_ops(model.owner) == {}  # the shared model is left unedited
    assert model.loss(list(session.ids)).item() == pytest.approx(session.loss, abs=1e-6)
