"""The token view in headless Chromium: a saved page (no server, no network), an 8k-token statistics page, and the
explorer's Heads tab. Hovering / clicking a token must show the run's own pattern row and column (to 4 decimals).

Uses Debian's /usr/bin/chromium through PyPI playwright; skips without it. Screenshots go to
test-artifacts/explorer/ (30-...).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

import headlab as hl
from headlab.explore import Explorer, ExplorerSettings, load_app_module
from headlab.paths import MQAR_TWINS_DIR
from test_explorer_browser import ARTIFACTS, CHROMIUM, FLAGS, TIMEOUT, _free_port
from test_token_view import HOSTILE, PROMPT

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _page(browser, height=1000, *, offline=True):
    """A page that records script errors, dialogs (an injected alert) and, offline, any request off the file."""
    page = browser.new_context(viewport={"width": 1300, "height": height}).new_page()
    page.set_default_timeout(TIMEOUT)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    if offline:
        page.on("request", lambda req: None if req.url.startswith(("file:", "data:"))
                else errors.append(f"network: {req.url}"))
    return page, errors


def _shown(page, scope=""):
    """The weights the page shows on each token now (data-w; None where it shows none)."""
    return page.eval_on_selector_all(f"{scope} .hlv-tok", "els => els.map(e => e.dataset.w ?? null)")


def _close(shown, expected):
    assert len(shown) == len(expected)
    for got, want in zip(shown, expected):
        assert got is not None and abs(float(got) - float(want)) <= 0.5e-4 + 1e-6, (shown, expected.tolist())


def test_saved_page_shows_the_runs_rows_and_columns(browser, tmp_path):
    m = hl.load("toy-induction", device="cpu")
    run = m.run(PROMPT, layers=[1])
    path = run.token_view(layer=1).save(tmp_path / "tokens.html")
    patterns = run.patterns(1)[0]  # [H, T, T]
    page, errors = _page(browser)
    page.goto(path.as_uri())
    page.wait_for_selector(".hlv-tok")
    assert page.locator(".hlv-card").count() == m.n_heads and page.locator(".hlv-tok").count() == len(PROMPT)
    q = 20
    page.locator(".hlv-tok").nth(q).hover()  # hovering previews the row of L1H0
    _close(_shown(page), patterns[0, q])
    page.locator(".hlv-tok").nth(q).click()  # clicking keeps it; another head's card focuses that head
    page.locator(".hlv-card", has_text="L1H2").click()
    page.mouse.move(0, 0)
    _close(_shown(page), patterns[2, q])
    assert page.inner_text(".hlv-detail").startswith(f"L1H2, token {q}:")
    page.screenshot(path=ARTIFACTS / "30-token-view-saved-page.png", full_page=True)
    page.locator(".hlv-controls button", has_text="column").click()  # what attends to token q
    _close(_shown(page)[q:], patterns[2, q:, q])
    page.context.close()
    assert errors == []


def test_hostile_tokens_render_as_text(browser, tmp_path):
    weights = torch.softmax(torch.randn(1, len(HOSTILE), len(HOSTILE)), -1)
    path = hl.viz.html.token_view(HOSTILE, weights, ["L0H0"]).save(tmp_path / "hostile.html")
    page, errors = _page(browser)
    page.goto(path.as_uri())
    page.wait_for_selector(".hlv-tok")
    shown = page.eval_on_selector_all(  # each token's hover title is `i: "<the token as a JSON string>"`
        ".hlv-tok", "els => els.map(e => JSON.parse(e.title.slice(e.title.indexOf(': ') + 2)))")
    assert shown == HOSTILE
    text = page.eval_on_selector_all(".hlv-tok", "els => els.map(e => e.textContent)")
    assert text[:3] == HOSTILE[:3] and text[5] == "\u21b5\u21e5"  # newline and tab shown as arrows
    assert page.locator("img").count() == 0 and page.locator("script").count() == 1
    assert errors == []  # no alert() ran, nothing was fetched
    page.context.close()


def test_8k_token_statistics_page(browser, tmp_path):
    """8192 tokens through a model's streaming statistics (the MQAR softmax twin: rotary positions, no length limit):
    the page carries per-token statistics and top-8 keys, never the 8192² matrix, and shows the StatsRun's values."""
    m = hl.load(str(MQAR_TWINS_DIR / "softmax-h64"), device="cpu")
    torch.manual_seed(0)
    n, k = 8192, 8
    run = m.stats(torch.randint(1, m.vocab_size, (1, n)), layers=[0], topk=k)
    st = run.layers[0]
    view = run.token_view()
    path = view.save(tmp_path / "long.html")
    assert view.nbytes < 4_000_000, view.nbytes  # dense: 4 heads x 8192² / 2 weights, over 160 MB at 2 bytes each
    page, errors = _page(browser)
    start = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_selector(f".hlv-tok >> nth={n - 1}")
    render_s = time.perf_counter() - start
    assert page.locator(".hlv-card").count() == m.n_heads
    i = 5000
    page.locator(".hlv-tok").nth(i).click()
    shown = _shown(page)
    for r in range(k):  # its top-k keys carry their exact weights
        key = int(st.topk_idx[0, 0, i, r])
        assert abs(float(shown[key]) - float(st.topk_weight[0, 0, i, r])) <= 0.5e-4 + 1e-6
    assert f"entropy {float(st.entropy[0, 0, i]):.4f}" in page.inner_text(".hlv-detail")
    page.screenshot(path=ARTIFACTS / "31-token-view-8k-statistics.png")
    page.context.close()
    assert errors == []
    print(f"8k-token statistics page: {view.nbytes / 1e6:.2f} MB payload, rendered in {render_s:.2f} s")


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("gradio")
    explorer = Explorer(ExplorerSettings(max_tokens=200, window=24, token_view_bytes=2_000))  # a layer of the
    app = load_app_module()                                                                  # toy's 4 heads: stats
    demo = app.build_app(explorer, model="toy-induction")
    url = app.launch(demo, port=_free_port(), block=False)
    yield url, explorer
    demo.close()


def test_explorer_heads_tab_token_view(browser, served):
    from playwright.sync_api import expect

    url, explorer = served
    page, errors = _page(browser, height=2000, offline=False)
    page.goto(url)
    expect(page.locator("#status")).to_contain_text("Loaded")
    model = explorer.cache.get("toy-induction")
    session = explorer.analyse("toy-induction", " ".join(map(str, PROMPT)), True, "induction")[3]
    ids, head = list(session.ids), explorer.best_head(session, "induction")
    page.fill("#prompt textarea", " ".join(map(str, PROMPT)))
    page.click("#analyse")
    expect(page.locator("#status")).to_have_text(f"Analysed {len(ids)} tokens with toy-induction; showing {head}.")
    expect(page.locator("#head-box textarea")).to_have_value(head)
    expect(page.locator("#token-view .hlv-title")).to_contain_text(f"{head} — pattern, {len(ids)} tokens")
    ref = hl.HeadRef.parse(head)
    pattern = model.run(ids, layers=[ref.layer]).patterns(ref.layer)[0]
    q = len(ids) - 3
    page.locator("#token-view .hlv-tok").nth(q).click()
    _close(_shown(page, "#token-view"), pattern[ref.head, q])
    page.screenshot(path=ARTIFACTS / "32-explorer-token-view-head.png", full_page=True)

    # the whole layer is over the 2 kB budget: statistics view, the shown head focused; a card shows its head
    page.locator("#token-scope label", has_text="its whole layer").click()
    expect(page.locator("#token-view .hlv-note")).to_contain_text("statistics view")
    expect(page.locator("#token-view .hlv-card.on")).to_have_attribute("data-head", head)
    st = model.stats(ids, layers=[ref.layer], topk=8).layers[ref.layer]
    page.locator("#token-view .hlv-tok").nth(q).click()
    shown = _shown(page, "#token-view")
    for r in range(8):
        key = int(st.topk_idx[0, ref.head, q, r])
        assert abs(float(shown[key]) - float(st.topk_weight[0, ref.head, q, r])) <= 0.5e-4 + 1e-6
    other = f"L{ref.layer}H{(ref.head + 1) % model.n_heads}"
    page.locator("#token-view .hlv-card", has_text=other).click()
    expect(page.locator("#head-box textarea")).to_have_value(other)
    expect(page.locator("#status")).to_contain_text(f"showing {other}")
    expect(page.locator("#token-view .hlv-card.on")).to_have_attribute("data-head", other)
    page.screenshot(path=ARTIFACTS / "33-explorer-token-view-layer-statistics.png", full_page=True)
    page.context.close()
    assert errors == []


def test_signed_weights_get_a_diverging_scale(browser, tmp_path):
    """DeltaNet's implicit pattern has negative weights: red > 0, blue < 0, by |w| / max |w| of the row shown."""
    m = hl.load("twin-recall-deltanet", device="cpu")
    run = m.run(list(range(1, 40)), layers=[1])
    row = run.pattern(hl.HeadRef(1, 0))[0, 38]
    assert bool((row < -1e-3).any()) and bool((row > 1e-3).any())
    path = run.token_view(heads=["L1H0"]).save(tmp_path / "signed.html")
    page, errors = _page(browser)
    page.goto(path.as_uri())
    page.locator(".hlv-tok").nth(38).click()
    _close(_shown(page), row)
    colours = page.eval_on_selector_all(".hlv-tok", "els => els.map(e => e.style.background)")
    for j in (int(row.argmin()), int(row.argmax()), int(row.abs().argsort()[-5])):
        r, g, b, a = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", colours[j]).groups()
        assert (r, g, b) == (("31", "119", "180") if row[j] < 0 else ("214", "39", "40"))
        assert abs(float(a or 1) - abs(float(row[j])) / float(row.abs().max())) < 2e-3
    assert "signed weights: red > 0, blue < 0" in page.inner_text(".hlv-legend")
    page.screenshot(path=ARTIFACTS / "37-token-view-deltanet-signed.png", full_page=True)
    page.context.close()
    assert errors == []
