#!/usr/bin/env python
"""Execute the notebooks and keep their outputs for the documentation (`make notebooks`).

    python scripts/execute_notebooks.py                  # every notebook of the tutorials
    python scripts/execute_notebooks.py quickstart sinks # some, by name (attention_sinks or sinks both work)
    python scripts/execute_notebooks.py --stale          # only those whose generator changed since they ran

Each notebook is built from its generator's current cells (notebooks/make_<name>.py), run top to bottom with
nbclient in notebooks/ (as tests/test_notebooks.py runs it) and written with its outputs to
notebooks/executed/<name>.ipynb. scripts/docs_gen.py renders the tutorial pages from those files, so the site
shows real outputs without running anything at build time; tests/test_docs_tutorials.py fails when a generator's
cells no longer match its executed copy.

Plotly figures are kept as their JSON (`PLOTLY_RENDERER=plotly_mimetype`), never with plotly.js inside the
notebook. A notebook whose run raises is not written (the previous copy stays) and the command exits 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXECUTED_DIR = NOTEBOOK_DIR / "executed"
META_KEY = "headlab_executed"


def generator(name: str):
    """The module notebooks/make_<name>.py (its CELLS, NOTEBOOK and ID_PREFIX)."""
    path = NOTEBOOK_DIR / f"make_{name}.py"
    if not path.exists():
        raise SystemExit(f"no generator {path.relative_to(ROOT)}")
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"_notebook_generator_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    return module


def expected_cells(name: str) -> list[tuple[str, str, str | None]]:
    """(cell type, source, id) of every cell the generator writes now."""
    mod = generator(name)
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        from nbwrite import build_notebook
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    nb = build_notebook(mod.CELLS, id_prefix=mod.ID_PREFIX)
    return [(c.cell_type, c.source, c.get("id")) for c in nb.cells]


def executed_path(name: str) -> Path:
    return EXECUTED_DIR / f"{name}.ipynb"


def is_stale(name: str) -> bool:
    """True when notebooks/executed/<name>.ipynb is missing or its cells differ from the generator's."""
    import nbformat

    path = executed_path(name)
    if not path.exists():
        return True
    nb = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source, c.get("id")) for c in nb.cells] != expected_cells(name)


def execute(name: str, *, timeout: int = 1800) -> float:
    """Run the generator's notebook and write it with outputs to notebooks/executed/<name>.ipynb; the seconds taken."""
    import nbformat
    from nbclient import NotebookClient

    mod = generator(name)
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        from nbwrite import build_notebook
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    nb = build_notebook(mod.CELLS, id_prefix=mod.ID_PREFIX)
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"  # the kernel inherits it: figures as JSON, no plotly.js
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        raise RuntimeError(f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    nb.metadata[META_KEY] = {
        "generator": f"notebooks/make_{name}.py", "command": f"python scripts/execute_notebooks.py {name}",
        "seconds": round(seconds, 1), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}
    EXECUTED_DIR.mkdir(exist_ok=True)
    write_compact(nb, executed_path(name))
    return seconds


def write_compact(nb, path: Path) -> None:
    """nbformat's JSON without its indentation: a figure's grid of numbers and hover labels would otherwise take a
    line per value (2-3× the bytes). Any notebook reader opens it."""
    import json

    import nbformat

    nbformat.validate(nb)
    text = json.dumps(json.loads(nbformat.writes(nb)), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def resolve(names: list[str], known: list[str]) -> list[str]:
    out = []
    for n in names:
        hits = [k for k in known if k == n] or [k for k in known if n in k]
        if len(hits) != 1:
            raise SystemExit(f"{n!r} names {'no' if not hits else 'more than one'} notebook of {known}")
        out.append(hits[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every tutorial)")
    parser.add_argument("--stale", action="store_true", help="only the notebooks whose executed copy is out of date")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from docs_tutorials import NOTEBOOKS

    names = resolve(args.names, NOTEBOOKS) if args.names else list(NOTEBOOKS)
    if args.stale:
        names = [n for n in names if is_stale(n)]
        if not names:
            print("every executed copy matches its generator: nothing to run")
    failed = []
    for name in names:
        print(f"executing {name} ...", flush=True)
        try:
            seconds = execute(name, timeout=args.timeout)
        except Exception as err:  # noqa: BLE001 - report and go on with the next notebook
            print(f"FAILED {name}: {err}", flush=True)
            failed.append(name)
            continue
        size = executed_path(name).stat().st_size
        print(f"wrote {executed_path(name).relative_to(ROOT)} ({seconds:.0f} s, {size / 1024:.0f} KiB)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
