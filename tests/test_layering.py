"""The import layering stays true: checked statically on the source (ast), plus what `import headlab` loads.

Layers, lowest first (a module may import only its own layer and those below it):

    headlab_kernels (torch, triton; never headlab)
    errors, heads, paths, version, sink_rule, losses, inputs  leaves
    capture (the seam), run, stats, models            the seam and model adapters
    edits                                             scoped head edits (never analyses)
    results, viz, tasks                               persistence; figures take data (never a model or a run)
    analyses, icl, prune, circuits, explore           analyses and their experiments
    moh, linearize                                    MoH conversion, linearization (they read prune's rankers / evals)
    cli                                               the only place with argparse

Known departures are listed with their reason below; the test fails when a new one appears *and* when a listed one
is fixed (so the list only shrinks).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"headlab": ROOT / "headlab", "headlab_kernels": ROOT / "kernels" / "headlab_kernels"}

# (importer prefix, forbidden prefix)
RULES = [
    ("headlab_kernels", "headlab"),
    ("headlab.errors", "headlab"), ("headlab.heads", "headlab.models"), ("headlab.paths", "headlab"),
    ("headlab.version", "headlab"), ("headlab.sink_rule", "headlab"), ("headlab.losses", "headlab"), ("headlab.inputs", "headlab"),
    ("headlab.capture", "headlab.models"), ("headlab.capture", "headlab.edits"),
    ("headlab.models", "headlab.prune"), ("headlab.models", "headlab.analyses"), ("headlab.models", "headlab.icl"),
    ("headlab.models", "headlab.edits"), ("headlab.models", "headlab.cli"), ("headlab.models", "headlab.explore"),
    ("headlab.edits", "headlab.analyses"), ("headlab.edits", "headlab.prune"), ("headlab.edits", "headlab.icl"),
    ("headlab.edits", "headlab.cli"),
    ("headlab.viz", "headlab.models"), ("headlab.viz", "headlab.run"), ("headlab.viz", "headlab.capture"),
    ("headlab.viz", "headlab.stats"), ("headlab.viz", "headlab.analyses"),
    ("headlab.results", "headlab.analyses"), ("headlab.results", "headlab.prune"),
    ("headlab.analyses", "headlab.cli"), ("headlab.prune", "headlab.cli"), ("headlab.icl", "headlab.cli"),
    ("headlab.explore", "headlab.cli"), ("headlab.circuits", "headlab.cli"), ("headlab.circuits", "headlab.prune"),
    ("headlab.models", "headlab.circuits"), ("headlab.edits", "headlab.circuits"), ("headlab.viz", "headlab.circuits"),
    ("headlab.results", "headlab.circuits"), ("headlab.tasks.circuits", "headlab.models"),
    ("headlab.tasks", "headlab.circuits"),
    # moh sits above prune (its conversion sweep measures static pruning by prune's rankers beside it)
    ("headlab.moh", "headlab.cli"), ("headlab.prune", "headlab.moh"), ("headlab.models", "headlab.moh"),
    ("headlab.edits", "headlab.moh"), ("headlab.viz", "headlab.moh"), ("headlab.results", "headlab.moh"),
    ("headlab.tasks", "headlab.moh"), ("headlab.analyses", "headlab.moh"), ("headlab.circuits", "headlab.moh"),
    # linearize trains and measures (its hybrid sweep reads prune's text eval): nothing below imports it
    # executors run a sweep's units (here or on Ray); they know nothing of models or analyses
    ("headlab.executors", "headlab.models"), ("headlab.executors", "headlab.prune"), ("headlab.executors", "headlab.cli"),
    ("headlab.executors", "headlab.analyses"),
    ("headlab.linearize", "headlab.cli"), ("headlab.prune", "headlab.linearize"), ("headlab.models", "headlab.linearize"),
    ("headlab.edits", "headlab.linearize"), ("headlab.viz", "headlab.linearize"), ("headlab.results", "headlab.linearize"),
    ("headlab.analyses", "headlab.linearize"), ("headlab.moh", "headlab.linearize"),
]
# private names of the seam: only capture itself, HeadModel and edits may use them
SEAM_PRIVATE = {"activate", "_STATE", "active_ops"}
SEAM_OWNERS = ("headlab.capture", "headlab.models.head_model", "headlab.edits")

KNOWN = {
    # `python -m headlab.icl.report` delegates to the CLI under its __main__ guard
    ("import", "headlab.icl.report", "headlab.cli"),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import statement, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names]))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations() -> set[tuple[str, str, str]]:
    found = set()
    for name, path in _modules().items():
        for module, names in _imports(name, path):
            targets = [module] + [f"{module}.{n}" for n in names]
            for importer, forbidden in RULES:
                if _under(name, importer) and any(_under(t, forbidden) for t in targets):
                    if not (forbidden == "headlab" and _under(module, "headlab_kernels")):
                        found.add(("import", name, module))
            if module == "argparse" and not _under(name, "headlab.cli"):
                found.add(("argparse", name, module))
            if _under(module, "headlab.capture") and not any(_under(name, o) for o in SEAM_OWNERS):
                for n in set(names) & SEAM_PRIVATE:
                    found.add(("seam", name, n))
    return found


def test_layering_rules_hold():
    found = _violations()
    new = sorted(found - KNOWN)
    fixed = sorted(KNOWN - found)
    assert not new, "layering violations:\n" + "\n".join(map(str, new))
    assert not fixed, "fixed (remove from KNOWN):\n" + "\n".join(map(str, fixed))


def test_argparse_lives_only_in_the_cli():
    assert not [v for v in _violations() if v[0] == "argparse"]


def test_the_checker_sees_a_planted_violation(tmp_path, monkeypatch):
    """The test above could not pass vacuously: a planted `edits -> analyses` import is found."""
    fake = tmp_path / "headlab"
    (fake / "edits").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "edits" / "__init__.py").write_text("")
    (fake / "edits" / "bad.py").write_text("import argparse\nfrom headlab.analyses.sinks import SinkRule\n"
                                           "from headlab.capture import activate\n")
    monkeypatch.setitem(PACKAGES, "headlab", fake)
    monkeypatch.setitem(PACKAGES, "headlab_kernels", tmp_path / "none")
    assert _violations() == {("import", "headlab.edits.bad", "headlab.analyses.sinks"),
                             ("argparse", "headlab.edits.bad", "argparse")}
    (fake / "analyses").mkdir()
    (fake / "analyses" / "x.py").write_text("from headlab.capture import activate\n")
    assert ("seam", "headlab.analyses.x", "activate") in _violations()


def test_import_headlab_loads_no_training_or_cli_code():
    code = ("import sys, headlab; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('headlab'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    heavy = [m for m in loaded if _under(m, "headlab.icl") or _under(m, "headlab.prune") or _under(m, "headlab.cli")
             or _under(m, "headlab.circuits") or _under(m, "headlab.moh") or _under(m, "headlab.linearize")
             or m in ("headlab.models.linear.train", "headlab.models.toy", "headlab.explore")]
    assert not heavy, heavy
    assert "headlab.models.head_model" in loaded  # and the core is there
