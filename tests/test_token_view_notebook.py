"""The quickstart notebook, executed, carries the token view inline: text/html outputs holding the views' payloads,
whose weights equal the toy model's patterns recomputed here; and those outputs render in JupyterLab itself (a real
server and headless Chromium), where the inline script of a trusted output draws the view."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

import headlab as hl
from headlab.viz.html import SCALE, read_payload
from test_token_view import dense_weights

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    path = tmp_path_factory.mktemp("notebook") / "quickstart.ipynb"
    nbformat.write(nb, path)
    return nb, path


def _views(nb):
    """{kind: (cell source, html)} of the outputs that carry a headlab view."""
    out = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html", "")
            if "data-headlab" in html:
                out[read_payload(html)["kind"]] = (cell.source, html)
    return out


def test_executed_notebook_outputs_carry_the_views(executed):
    nb, _ = executed
    views = _views(nb)
    assert set(views) == {"tokens", "stats", "grid"}
    source, html = views["tokens"]
    assert "run.token_view(layer=head.layer)" in source and "<script>" in html
    payload = read_payload(html)
    ids = [int(t.removeprefix("#")) for t in payload["tokens"]]  # toy-induction has no tokenizer: tokens are #id
    layer = int(payload["labels"][0][1:payload["labels"][0].index("H")])
    m = hl.load("toy-induction", device="cpu")
    expected = m.run(ids, layers=[layer]).patterns(layer)[0]
    assert payload["labels"] == [f"L{layer}H{h}" for h in range(m.n_heads)]
    assert (dense_weights(payload) - expected).abs().max() <= 0.5 / SCALE + 1e-7
    stats = read_payload(views["stats"][1])
    assert stats["k"] == 8 and len(stats["tokens"]) == 256 and len(stats["labels"]) == 1
    grid = read_payload(views["grid"][1])
    assert len(grid["values"]) == m.n_layers and len(grid["values"][0]) == m.n_heads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt install chromium)")
def test_outputs_render_in_jupyterlab(executed, tmp_path):
    """JupyterLab (local, no token, no browser of its own) opens the executed notebook; it trusts outputs it was
    told to (`jupyter trust`, what executing the cells yourself does) and runs their inline scripts."""
    pytest.importorskip("jupyterlab")
    from playwright.sync_api import expect, sync_playwright

    _, path = executed
    folder = tmp_path / "lab"
    folder.mkdir()
    notebook = folder / "quickstart.ipynb"
    shutil.copy(path, notebook)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    subprocess.run([sys.executable, "-m", "jupyter", "trust", str(notebook)], env=env, check=True,
                   capture_output=True)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--allow-root", "--IdentityProvider.token=", "--ServerApp.password=",
         f"--ServerApp.root_dir={folder}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    server.kill()
                    pytest.fail(f"jupyter lab did not start:\n{server.communicate()[0][-3000:]}")
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                          "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/quickstart.ipynb")
            views = page.locator(".jp-OutputArea-output .headlab-view")
            expect(views).to_have_count(3, timeout=90_000)  # JupyterLab's first load takes a while
            token_view = views.nth(0)
            token_view.scroll_into_view_if_needed()
            expect(token_view.locator(".hlv-card")).to_have_count(4, timeout=30_000)  # drawn by the inline script
            token_view.locator(".hlv-tok").nth(60).click()
            detail = token_view.locator(".hlv-detail").inner_text()
            assert re.match(r"L\dH0, token 60:", detail), detail
            ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "explorer"
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            token_view.screenshot(path=ARTIFACTS / "34-jupyterlab-token-view.png")
            expect(views.nth(1).locator(".hlv-tok")).to_have_count(256)
            expect(views.nth(2).locator(".hlv-cell")).to_have_count(8)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
