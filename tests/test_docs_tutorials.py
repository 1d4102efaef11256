"""The tutorial pages come from executed notebooks: the executed copies are current, clean and rendered faithfully."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_tutorials
import execute_notebooks

sys.path.pop(0)

NOTEBOOKS = docs_tutorials.NOTEBOOKS
MAX_EXECUTED_BYTES = 3_000_000  # figures' JSON and text, compact: 20 KiB to 1.9 MB (softmax_vs_linear's grids)
NEWPLOT = re.compile(r'<script>Plotly\.newPlot\("([^"]+)",(.*)\);</script>')


def _executed(name: str) -> nbformat.NotebookNode:
    path = execute_notebooks.executed_path(name)
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make notebooks` "
                    f"(or python scripts/execute_notebooks.py {name}), then python scripts/docs_gen.py")
    return nbformat.read(path, as_version=4)


def test_every_notebook_is_a_tutorial():
    """Each notebooks/*.ipynb has a tutorial page (so each gets an executed copy), and nothing extra is executed."""
    committed = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(NOTEBOOKS) == committed
    extra = sorted(p.stem for p in execute_notebooks.EXECUTED_DIR.glob("*.ipynb") if p.stem not in NOTEBOOKS)
    assert not extra, f"executed copies without a notebook: {extra}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_matches_generator(name):
    """The executed copy holds exactly the cells its generator writes now: a changed notebook whose outputs were
    not regenerated fails here."""
    nb = _executed(name)
    got = [(c.cell_type, c.source, c.get("id")) for c in nb.cells]
    want = execute_notebooks.expected_cells(name)
    if got != want:
        diff = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want + [None] * len(got))) if a != b)
        pytest.fail(f"notebooks/executed/{name}.ipynb is out of date with notebooks/make_{name}.py (first difference "
                    f"at cell {diff}): run `make notebooks` (or python scripts/execute_notebooks.py {name}), then "
                    "python scripts/docs_gen.py")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_copy_is_complete_and_small(name):
    nb = _executed(name)
    path = execute_notebooks.executed_path(name)
    assert path.stat().st_size < MAX_EXECUTED_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    meta = nb.metadata[execute_notebooks.META_KEY]
    assert meta["generator"] == f"notebooks/make_{name}.py" and meta["seconds"] > 0
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        assert cell.execution_count is not None, f"{name}: a code cell was not run"
        for out in cell.outputs:
            assert out.output_type != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
            data = out.get("data", {})
            # figures as JSON only: plotly.js (megabytes) is served by the site, never stored per notebook
            assert "plotly.js" not in "".join(data.get("text/html", "")), f"{name} embeds plotly.js"


def _figures(nb) -> list[dict]:
    return [o["data"][docs_tutorials.PLOTLY_MIME] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if docs_tutorials.PLOTLY_MIME in o.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_page_draws_every_figure_of_the_run(name):
    """The page embeds each plotly output of the executed run, data and layout unchanged, in order, with plotly.js
    loaded (from the site) before the first one; every markdown and code cell is on the page."""
    nb = _executed(name)
    page = docs_tutorials.tutorial_page(name)
    figures = _figures(nb)
    drawn = NEWPLOT.findall(page)
    assert len(drawn) == len(figures)
    for (div_id, args), fig in zip(drawn, figures):
        assert f'<div class="nb-plotly" id="{div_id}"' in page
        data, layout = json.loads("[" + args.replace("<\\/", "</").rsplit(',{"responsive"', 1)[0] + "]")
        assert data == fig["data"] and layout == fig.get("layout", {})
    if figures:
        assert page.index(f'<script src="../{docs_tutorials.PLOTLY_JS}"></script>') < page.index("Plotly.newPlot")
    else:
        assert "plotly.min.js" not in page
    for cell in nb.cells:
        if cell.source.strip():
            assert cell.source.rstrip() in page, f"{name}: a {cell.cell_type} cell is missing from the page"


def test_page_size_is_sane():
    """Figures are data, not scripts: no tutorial page (plotly.js excluded, it is one shared file) passes 2.5 MB;
    most are under 200 KB (softmax_vs_linear's two 65×65 pattern grids carry a hover label per cell: 1.9 MB)."""
    sizes = {name: len(docs_tutorials.tutorial_page(name).encode()) for name in NOTEBOOKS}
    assert max(sizes.values()) < 2_500_000, sizes
    assert sorted(sizes.values())[len(sizes) // 2] < 200_000, sizes


def test_progress_bars_resolve_to_their_last_state():
    """A real tqdm bar written to a stream: the page shows the final line of each bar, not every redraw."""
    from tqdm import tqdm

    buf = io.StringIO()
    for _ in tqdm(range(5), file=buf, desc="work", ascii=True, mininterval=0):
        pass
    buf.write("result 42\n")
    text = docs_tutorials.clean_text(buf.getvalue())
    assert text.count("work") == 1 and "5/5" in text and text.endswith("result 42")
    # on stderr the bar itself is noise and goes; the rest stays
    assert docs_tutorials.quiet_stderr(buf.getvalue()) == "result 42"


def test_script_text_cannot_end_the_embedding():
    """A figure whose text holds "</script>" stays inside its script element."""
    block = docs_tutorials.plotly_block({"data": [{"type": "bar", "name": "</script><b>x"}], "layout": {}}, "f")
    script = block.split("<script>", 1)[1]
    assert script.count("</script>") == 1 and script.endswith("</script>")
    assert '"<\\/script><b>x"' in script


def test_missing_executed_copy_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_tutorials, "EXECUTED_DIR", tmp_path)
    page = docs_tutorials.tutorial_page("quickstart")
    assert "python scripts/execute_notebooks.py quickstart" in page and "Plotly.newPlot" not in page
