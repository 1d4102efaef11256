"""What every notebook generator here shares: turning (kind, source) cells into a written .ipynb."""

from __future__ import annotations

from pathlib import Path

import nbformat


def build_notebook(cells: list[tuple[str, str]], *, id_prefix: str | None = None) -> nbformat.NotebookNode:
    """`cells` ("md" or code, source) as a notebook with a Python 3 kernelspec; stable cell ids if a prefix is given."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    if id_prefix is not None:
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{id_prefix}-{i:02d}"
    return nb


def write_notebook(cells: list[tuple[str, str]], path: Path, *, id_prefix: str | None = None) -> None:
    """Write `cells` ("md" or code, source) to `path` with a Python 3 kernelspec; stable cell ids if a prefix is given."""
    nbformat.write(build_notebook(cells, id_prefix=id_prefix), path)
    print(f"wrote {path}")
