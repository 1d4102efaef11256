"""MkDocs hook (mkdocs.yml `hooks:`): serve plotly.js from the site itself, for the tutorials' figures.

The installed plotly package's plotly.min.js (the same version that wrote the figures' JSON) is added to the
build as assets/javascripts/plotly.min.js; the tutorial pages (scripts/docs_tutorials.py) load it with a relative
<script src>. Nothing is fetched from a CDN, and nothing large is committed under docs/site/.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

PLOTLY_JS = "assets/javascripts/plotly.min.js"


def plotly_js_path() -> Path:
    try:
        import plotly
    except ImportError as err:  # the docs extra installs plotly with headlab; say so instead of a broken page
        raise PluginError("the tutorials' figures need plotly installed (pip install -e .[docs])") from err
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise PluginError(f"plotly is installed without its bundled plotly.min.js ({path})")
    return path


def on_files(files, config):
    files.append(File.generated(config, PLOTLY_JS, abs_src_path=str(plotly_js_path())))
    return files
