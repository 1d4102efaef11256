"""The documentation site in headless Chromium: the home page, an API page, a tutorial with its plotly figures
drawn, and the reproductions page, served over HTTP from build/docs-site/ and screenshotted to test-artifacts/docs/.

Builds the site first (`mkdocs build --strict` into build/docs-site/, the second step of `make docs`). Uses Debian's
/usr/bin/chromium through PyPI playwright (never `playwright install`); skips without it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"  # as tests/test_explorer_browser.py (importing it would load the explorer)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("playwright")

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "docs-site"
ARTIFACTS = ROOT / "test-artifacts" / "docs"
TIMEOUT = 30_000  # ms
TUTORIAL = "tutorials/attention_sinks.html"  # a tutorial with several plotly figures

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt install chromium)")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on the test's stderr
        pass


@pytest.fixture(scope="module")
def served():
    """The freshly built site, served from build/docs-site/ on a free localhost port."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(SITE)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _visit(browser, url: str):
    """(page, problems): the page loaded, and every console error, failed request and HTTP error it caused."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, problems


@pytest.mark.parametrize("path, shot, must_have", [
    ("index.html", "01-home.png", "headlab"),
    ("reference/api/headlab.html", "02-api-headlab.png", "HeadModel"),
    ("reproductions.html", "04-reproductions.png", "Reproductions"),
])
def test_page_renders_without_errors(served, browser, path, shot, must_have):
    page, problems = _visit(browser, f"{served}/{path}")
    assert must_have in page.inner_text("article")
    page.screenshot(path=ARTIFACTS / shot)
    assert not problems, "\n".join(problems)
    page.context.close()


def test_reproduction_tables_render(served, browser):
    """The retrieval-head and pruning sections (generated from benchmarks/results/) are on the page, as tables."""
    page, problems = _visit(browser, f"{served}/reproductions.html")
    for heading in ("Retrieval heads", "Head pruning"):
        section = page.locator("h2", has_text=heading)
        assert section.count() == 1, heading
        assert page.locator(f"h2:has-text('{heading}') ~ * table").count() >= 1  # Material wraps tables
    page.locator("h2", has_text="Retrieval heads").evaluate("e => e.scrollIntoView()")
    page.screenshot(path=ARTIFACTS / "05-reproductions-retrieval.png")
    page.locator("h2", has_text="Head pruning").evaluate("e => e.scrollIntoView()")
    page.screenshot(path=ARTIFACTS / "06-reproductions-pruning.png")
    assert not problems, "\n".join(problems)
    page.context.close()


def test_tutorial_figures_render(served, browser):
    """Every figure of the executed notebook is drawn by the site's own plotly.js: a .js-plotly-plot with an SVG of
    real size for each nb-plotly div, no console errors, no missing files."""
    page, problems = _visit(browser, f"{served}/{TUTORIAL}")
    n_divs = page.locator("div.nb-plotly").count()
    assert n_divs >= 2
    page.wait_for_function(f"document.querySelectorAll('div.nb-plotly.js-plotly-plot').length === {n_divs}")
    first = page.locator("div.nb-plotly.js-plotly-plot").first
    first.scroll_into_view_if_needed()
    box = first.locator("svg.main-svg").first.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 200, box
    assert page.locator("div.nb-plotly.js-plotly-plot .plot-container").count() == n_divs
    assert page.evaluate("typeof Plotly === 'object' && Plotly.version.length > 0")
    assert not any("cdn" in s for s in page.eval_on_selector_all("script[src]", "els => els.map(e => e.src)"))
    page.screenshot(path=ARTIFACTS / "03-tutorial-figure.png")
    assert not problems, "\n".join(problems)
    page.context.close()


def test_tutorial_token_views_render(served, browser):
    """headlab's own token views (a notebook's text/html outputs, with their inline renderer) draw on the page."""
    page, problems = _visit(browser, f"{served}/tutorials/quickstart.html")
    views = page.locator("div.nb-html .headlab-view")
    assert views.count() > 0, "the quickstart's executed copy shows no token view"
    page.wait_for_function("document.querySelectorAll('.headlab-view').length === "
                           "document.querySelectorAll('.headlab-view .hlv').length")
    heights = page.eval_on_selector_all(".headlab-view", "els => els.map(e => e.getBoundingClientRect().height)")
    assert all(h > 50 for h in heights), heights
    views.first.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "07-tutorial-token-view.png")
    assert not problems, "\n".join(problems)
    page.context.close()
