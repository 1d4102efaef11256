"""The documentation site: generated pages up to date, `mkdocs build --strict` passes, every internal link resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "scripts" / "docs_gen.py"


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs-site")
    res = _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)])
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}"
    return out


def test_generated_pages_up_to_date():
    """The committed CLI reference, tutorials and reproductions page are what scripts/docs_gen.py writes now
    (from build_parser(), the notebooks and the result files)."""
    res = _run([sys.executable, str(GEN), "--check"])
    assert res.returncode == 0, res.stderr + "\nrun: python scripts/docs_gen.py"


def test_cli_page_lists_every_command():
    import argparse

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs_gen
    finally:
        sys.path.pop(0)
    from headlab.cli import build_parser

    page = (ROOT / "docs" / "site" / "reference" / "cli.md").read_text()

    def walk(parser: argparse.ArgumentParser, path: list[str]):
        yield path
        for name, _, sub in docs_gen._subcommands(parser):
            yield from walk(sub, [*path, name])

    for path in walk(build_parser(), []):
        assert f"`{' '.join(['headlab', *path])}`" in page, f"headlab {' '.join(path)} is missing from cli.md"


def test_strict_build_succeeds(site: Path):
    for page in ("index.html", "reproductions.html", "reference/cli.html", "reference/api/headlab.html",
                 "tutorials/quickstart.html", "concepts/scopes.html", "coming-from.html"):
        assert (site / page).is_file(), page
    api = (site / "reference" / "api" / "headlab.html").read_text()
    for ident in ("headlab.HeadModel.run", "headlab.Run.pattern", "headlab.edit", "headlab.HeadRef.tl_hook"):
        assert f'id="{ident}"' in api, ident
    # no page asks the network for fonts or scripts
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert "fonts.googleapis.com" not in text and "cdn.plot.ly" not in text, html
    # the tutorials' figures are drawn by the installed plotly's own plotly.js, served with the site
    import plotly

    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert (site / "assets" / "javascripts" / "plotly.min.js").read_bytes() == bundled.read_bytes()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and (tag in ("a", "img", "script") or (tag == "link" and key == "href")):
                self.hrefs.append(a[key])


def test_internal_links_resolve(site: Path):
    parsed: dict[Path, _Links] = {}

    def page(path: Path) -> _Links:
        if path not in parsed:
            p = _Links()
            p.feed(path.read_text(errors="replace"))
            parsed[path] = p
        return parsed[path]

    broken = []
    for html in sorted(site.rglob("*.html")):
        for href in page(html).hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:", "data:")):
                continue
            if not parts.path:
                target = html
            elif parts.path.startswith("/"):  # 404.html links from the site root (no site_url)
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = (html.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{html.relative_to(site)}: {href} (no file)")
                continue
            if parts.fragment and target.suffix == ".html" and parts.fragment not in page(target).ids:
                broken.append(f"{html.relative_to(site)}: {href} (no anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:50])


def test_no_external_references_in_pages():
    """Hand-written pages link inside the site only (the site is read offline)."""
    for md in (ROOT / "docs" / "site").rglob("*.md"):
        for url in re.findall(r"\]\((https?://[^)]+)\)", md.read_text()):
            pytest.fail(f"{md.relative_to(ROOT)} links outside the site: {url}")
