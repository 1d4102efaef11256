"""Saved reports in the explorer: recognise any folder a headlab command writes, load it, and lay it out.

`open_report(folder)` tells the folder's kind from its files (`detect`), loads it with the result class that wrote
it, and returns a `Report`: kind, title, the settings that produced it (a Markdown table), its top heads (a Markdown
table, where the result has per-head scores; `Report.top` holds the same rows as values) and its figures (plotly,
built by headlab.viz from the loaded data). The per-kind loaders live in `explore/report_kinds.py`.

A folder that is not a headlab report, whose marker file (the file a command writes last) is missing or damaged, or
that a command is still writing, raises a `ReportError` naming the folder and what is wrong.

`ReportLibrary` is what the explorer serves: the report folders found under its roots (and those opened at launch),
opened on demand and cached. Clients pick among them; any other folder only when the explorer allows folders.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from headlab.errors import HeadlabError
from headlab.paths import ROOT
from headlab.results import read_json

#: The kinds `detect` tells apart (the command that writes each).
KINDS = {
    "induction": "headlab scan induction", "sinks": "headlab scan sinks", "retrieval": "headlab scan retrieval",
    "calibration": "headlab calibrate", "prune": "headlab prune", "icl": "headlab icl train",
    "kinds": "KindComparison.save (compare_kinds)", "circuit": "headlab circuit discover",
    "moh_convert": "headlab moh convert", "moh_routing": "headlab moh analyse",
    "linearize": "headlab linearize analyse", "twins": "headlab train twins",
    "scores": "a saved HeadScores (any analysis)",
}
#: Files whose presence makes a folder look like a report (finished, damaged or in progress).
MARKERS = ("scores.json", "items.safetensors", "run.json", "results.jsonl", "rows.jsonl", "checkpoint.safetensors",
           "circuit.json", "comparison.json", "state.json", "trials.jsonl", "summary.json")
RUNS_DIR = ROOT / "runs"


class ReportError(HeadlabError):
    """A folder the explorer cannot open as a report: unknown (`unknown` True: no headlab command wrote it), damaged,
    or still being written."""

    def __init__(self, message: str, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


@dataclass(frozen=True)
class Report:
    """One opened report folder, laid out for the explorer.

    Attributes:
        kind: one of `KINDS`.
        folder: the folder (resolved).
        title: a one-line title (kind, model, what was run).
        model: the model the result is about ("" when none).
        settings_md: the settings that produced it (params, then facts about the run), a Markdown table.
        top: top heads as (map, head, value) rows, best first per map (empty when the result has no per-head scores).
        figures: (name, plotly figure) pairs.
        notes_md: a few headline numbers (Markdown), where the result has them.
        result: the loaded result object (HeadScores, PruneResults, ICLRun, ...).
    """

    kind: str
    folder: Path
    title: str
    model: str = ""
    settings_md: str = ""
    top: tuple[tuple[str, str, float], ...] = ()
    figures: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    notes_md: str = ""
    result: Any = field(default=None, compare=False, repr=False)

    @property
    def top_md(self) -> str:
        """The top heads as a Markdown table (a sentence when the result has no per-head scores)."""
        if not self.top:
            return f"This {self.kind} report has no per-head scores."
        rows = "\n".join(f"| {m} | {h} | {v:.4g} |" for m, h, v in self.top)
        return f"| map | head | value |\n|---|---|---|\n{rows}"

    def figure(self, name: str | None = None) -> Any:
        """A figure by name (the first when None); a ReportError naming the choices otherwise."""
        if not self.figures:
            raise ReportError(f"{self.folder}: this {self.kind} report has no figures")
        if not name:
            return self.figures[0][1]
        for key, fig in self.figures:
            if key == name:
                return fig
        raise ReportError(f"{self.folder} has no figure {name!r}: choose one of {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.figures]

    def markdown(self) -> str:
        """Title, notes, top heads and settings as one Markdown text."""
        parts = [f"### {self.title}", f"`{self.folder}` — written by `{KINDS[self.kind]}`"]
        if self.notes_md:
            parts.append(self.notes_md)
        parts += ["#### Top heads", self.top_md, "#### Settings", self.settings_md]
        return "\n\n".join(parts)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def _json(path: Path) -> Any:
    """A marker JSON file (ReportError naming it when missing or damaged)."""
    try:
        return read_json(path)
    except HeadlabError as err:
        raise ReportError(f"{path.parent}: its marker file {path.name} is missing or damaged ({err})") from None


def _in_progress(folder: Path, what: str) -> ReportError:
    return ReportError(f"{folder} is not finished: {what}. It is still being written (or the command was "
                       "interrupted): open it once the command has finished, or rerun the command to complete it")


def detect(folder: str | Path) -> str:
    """The kind of report `folder` holds, told from its files (see `KINDS`); a ReportError when it is none, is
    damaged, or is still being written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder: give a folder written by a headlab command")
    if temp := _temp_files(folder):
        raise _in_progress(folder, f"a file is half-written ({temp[0]})")
    has = lambda name: (folder / name).exists()  # noqa: E731
    if has("checkpoint.safetensors"):
        if not has("run.json"):
            raise _in_progress(folder, "checkpoint.safetensors has no run.json beside it yet")
        run = _json(folder / "run.json")
        if isinstance(run, dict) and run.get("analysis") == "icl-regression":
            return "icl"
        raise ReportError(f"{folder}/run.json is not an `icl train` run (no analysis 'icl-regression')")
    if has("circuit.json"):
        return "circuit"
    if has("patching") and (folder / "patching").is_dir():
        raise _in_progress(folder, "patching/ is there but circuit.json (written last by `circuit discover`) is not")
    if has("comparison.json"):
        data = _json(folder / "comparison.json")
        if isinstance(data, dict) and "layer_kinds" in data:
            return "kinds"
        raise ReportError(f"{folder}/comparison.json is not a kinds comparison (a circuit comparison has no figures "
                          "the explorer shows yet)")
    if has("run.json") and (has("results.jsonl") or has("rows.jsonl") or not has("config.json")):
        run = _json(folder / "run.json")
        if isinstance(run, dict) and "identity" in run and "runs" in run:
            return "prune"
        if isinstance(run, dict) and "ks" in run and "identity" not in run:
            return "moh_convert"
        if not has("scores.json"):
            raise ReportError(f"{folder}/run.json is not a run the explorer knows (prune, moh convert, icl train)",
                              unknown=True)
    if (folder / "routing").is_dir():
        if has("summary.json"):
            return "moh_routing"
        raise _in_progress(folder, "routing/ is there but summary.json (written last by `moh analyse`) is not")
    if (folder / "transfer").is_dir():
        if has("report.json"):
            return "linearize"
        raise _in_progress(folder, "transfer/ is there but report.json (written last by `linearize analyse`) is not")
    if has("summary.json") and not has("scores.json") and twin_folders(folder):
        return "twins"
    if has("scores.json"):
        data = _json(folder / "scores.json")
        analysis = data.get("analysis") if isinstance(data, dict) else None
        if not isinstance(analysis, str) or "maps" not in data:
            raise ReportError(f"{folder}/scores.json is not a headlab result (no analysis and maps)")
        if not has("items.safetensors"):
            raise ReportError(f"{folder} has scores.json but no items.safetensors: a part is missing")
        return {"induction": "induction", "sinks": "sinks", "retrieval": "retrieval",
                "act_calibration": "calibration"}.get(analysis, "scores")
    for name, what in (("items.safetensors", "items.safetensors is there but scores.json (the marker) is not"),
                       ("state.json", "a `calibrate` run has state.json but no scores.json yet"),
                       ("trials.jsonl", "a `scan retrieval` run has trials.jsonl but no scores.json yet"),
                       ("results.jsonl", "results.jsonl has no run.json beside it")):
        if has(name):
            raise _in_progress(folder, what)
    raise ReportError(f"{folder} is not a headlab report: none of its files is one that a headlab command writes "
                      f"({', '.join(MARKERS)})", unknown=True)


def twin_folders(folder: Path) -> list[Path]:
    """The trained models of a `headlab train twins` folder: subfolders with an HF config.json and a run.json."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "run.json").is_file()
                  and (p / "config.json").is_file())


def open_report(folder: str | Path) -> Report:
    """Recognise, load and lay out the report in `folder` (see the module doc)."""
    from headlab.explore.report_kinds import LOADERS

    folder = Path(folder).expanduser().resolve()
    kind = detect(folder)
    try:
        return LOADERS[kind](folder)
    except HeadlabError as err:
        if isinstance(err, ReportError):
            raise
        raise ReportError(f"{folder} ({kind}) cannot be read: {err}") from None
    except (KeyError, TypeError, ValueError, IndexError, OSError, RuntimeError) as err:
        raise ReportError(f"{folder} ({kind}) is damaged: {type(err).__name__}: {err}") from None


def _looks_like_report(folder: Path) -> bool:
    return any((folder / m).exists() for m in MARKERS) or (folder / "routing").is_dir() or (
        (folder / "transfer").is_dir() and (folder / "report.json").exists())


def find_reports(roots: Iterable[str | Path], *, max_depth: int = 3, limit: int = 300) -> list[tuple[Path, str]]:
    """(folder, kind or "error: ...") of the report folders at or under `roots` (at most `max_depth` levels down;
    hidden folders and model folders skipped; a report's own subfolders are not listed separately)."""
    found: dict[Path, str] = {}

    def visit(folder: Path, depth: int) -> None:
        if len(found) >= limit or folder in found:
            return
        if _looks_like_report(folder):
            try:
                found[folder] = detect(folder)
            except ReportError as err:
                if not err.unknown:  # damaged or unfinished reports are listed (opening one names the problem)
                    found[folder] = f"error: {err}"
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            visit(child, depth + 1)

    for root in roots:
        root = Path(root).expanduser().resolve()
        if root.is_dir():
            visit(root, 0)
    return list(found.items())


def _stamp(folder: Path) -> tuple:
    """A cheap fingerprint of a folder's top-level files (a report rewritten since is loaded again)."""
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(folder)))
    except OSError:
        return ()


class ReportLibrary:
    """The report folders one explorer serves: those opened at launch and those found under its roots.

    Clients open reports by picking from `choices()`; `open` refuses any folder outside the roots and the launch's
    reports unless `allow_folders` (the same rule as ModelCache's: a client cannot make the server read arbitrary
    folders). Opened reports are cached (reloaded when their files change).
    """

    def __init__(self, opened: Iterable[str | Path] = (), roots: Iterable[str | Path] | None = None, *,
                 allow_folders: bool = False, max_depth: int = 3) -> None:
        self.opened = [Path(p).expanduser().resolve() for p in opened]
        if roots is None:
            roots = [*self.opened, *([RUNS_DIR] if RUNS_DIR.is_dir() else [])]
        self.roots = list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))
        self.allow_folders = allow_folders
        self.max_depth = max_depth
        self._cache: dict[Path, tuple[tuple, Report]] = {}
        self._lock = threading.Lock()

    def choices(self) -> list[tuple[str, str]]:
        """(label, folder) of every report folder served, those opened at launch first."""
        found = dict(find_reports(self.roots, max_depth=self.max_depth))
        out = []
        for folder in dict.fromkeys([*self.opened, *found]):
            kind = found.get(folder) or _quiet_kind(folder)
            out.append((f"{'⚠ ' if kind.startswith('error') else ''}{kind.split(':')[0]} · {self._short(folder)}",
                        str(folder)))
        return out

    def _short(self, folder: Path) -> str:
        for root in self.roots:
            if folder != root and folder.is_relative_to(root):
                return f"{root.name}/{folder.relative_to(root)}"
        return str(folder)

    def allowed(self, folder: Path) -> bool:
        return self.allow_folders or folder in self.opened or any(
            folder == r or folder.is_relative_to(r) for r in self.roots)

    def open(self, path: str | Path) -> Report:
        """The report in `path` (a folder among `choices()`, or any folder with `allow_folders`)."""
        text = str(path or "").strip()
        if not text:
            raise ReportError("choose a report folder from the list")
        folder = Path(text).expanduser().resolve()
        if not self.allowed(folder):
            roots = ", ".join(str(r) for r in self.roots) or "none"
            raise ReportError(f"this explorer opens the report folders under its report roots ({roots}) and those "
                              "given with --report; opening other folders is off (start it with --allow-folders to "
                              "let clients open any folder on the server)")
        stamp = _stamp(folder)
        with self._lock:
            hit = self._cache.get(folder)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        report = open_report(folder)
        with self._lock:
            self._cache[folder] = (stamp, report)
        return report

    def view(self, path: str | Path, figure: str | None = None) -> tuple[str, str, list[str], Any]:
        """The Reports tab's view of a folder: (status, Markdown of title, notes, top heads and settings, the figure
        names, the chosen figure (the first when None or not one of them; None when there are none))."""
        report = self.open(path)
        name = figure if figure in report.names else None
        fig = report.figure(name) if report.figures else None
        status = f"Opened the {report.kind} report {report.folder.name} ({len(report.figures)} figures)."
        return status, report.markdown(), report.names, fig

    def of_kind(self, kind: str) -> list[tuple[str, str]]:
        """(label, folder) of the served reports of one kind."""
        return [(label, value) for label, value in self.choices() if label.split(" · ")[0] == kind]


def _quiet_kind(folder: Path) -> str:
    try:
        return detect(folder)
    except ReportError as err:
        return f"error: {err}"


def md_table(rows: dict[str, Any], *, header: tuple[str, str] = ("setting", "value")) -> str:
    """A two-column Markdown table of flat key → value (floats to 4 significant digits, long values cut)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "NaN" if math.isnan(v) else f"{v:.4g}"
        text = str(v)
        text = text if len(text) <= 120 else text[:117] + "..."
        return text.replace("|", "\\|").replace("\n", " ")
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → dotted keys (lists kept as values)."""
    if not isinstance(data, dict):
        return {prefix or "value": data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
