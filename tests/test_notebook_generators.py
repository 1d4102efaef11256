"""Every notebook under notebooks/ has a generator (make_<name>.py), and the committed .ipynb is what it writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
GENERATORS = sorted(NOTEBOOK_DIR.glob("make_*.py"))
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _load(generator: Path, monkeypatch):
    """Import a generator by file path (it imports `nbwrite` from notebooks/, so that folder goes on sys.path)."""
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    spec = importlib.util.spec_from_file_location(f"_notebook_generator_{generator.stem}", generator)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_a_generator():
    assert NOTEBOOKS and GENERATORS
    missing = [p.name for p in NOTEBOOKS if not (NOTEBOOK_DIR / f"make_{p.stem}.py").exists()]
    assert not missing, f"notebooks without a make_<name>.py generator: {missing}"


@pytest.mark.parametrize("generator", GENERATORS, ids=[p.stem for p in GENERATORS])
def test_generator_reproduces_committed_notebook(generator, tmp_path, monkeypatch):
    module = _load(generator, monkeypatch)
    name = generator.stem.removeprefix("make_") + ".ipynb"
    assert module.NOTEBOOK == name
    assert module.ID_PREFIX, "a generator needs an ID_PREFIX so that its cell ids are stable"

    # Run the generator's own main(), with its write redirected away from the committed notebook.
    real_write = module.write_notebook
    calls = []

    def write_to_tmp(cells, path, **kwargs):
        calls.append((Path(path), kwargs))
        real_write(cells, tmp_path / Path(path).name, **kwargs)

    monkeypatch.setattr(module, "write_notebook", write_to_tmp)
    module.main()
    assert calls == [(NOTEBOOK_DIR / name, {"id_prefix": module.ID_PREFIX})]

    committed = NOTEBOOK_DIR / name
    assert committed.exists(), f"{generator.name} writes {name}, which is not committed"
    produced = nbformat.read(tmp_path / name, as_version=4)
    expected = nbformat.read(committed, as_version=4)

    def summary(nb):
        return [(c.cell_type, c.source, c.get("id")) for c in nb.cells]

    assert summary(produced) == summary(expected), f"{name} differs from what {generator.name} writes"
    assert produced.metadata.get("kernelspec") == expected.metadata.get("kernelspec")
    # notebooks are committed without outputs
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in expected.cells
               if c.cell_type == "code"), f"{name} is committed with outputs"
