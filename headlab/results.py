"""Result objects and the one persistence toolkit every writer uses.

`HeadScores`: per-head score maps `[L, H]` with the settings and per-item data that made them.

Persistence: every file a result writes is written atomically (`write_atomic`: a temp file in the same folder,
flushed and fsynced, then `os.replace`), so a kill leaves the old file or the new one, never half of one; a folder's
summary file is written last, as its commit marker (`HeadScores.save` writes items, then scores.json). JSON lines
(`append_jsonl` / `read_jsonl`) end a torn last line before appending and skip it when reading. A saved result that
cannot be read is treated as absent with a warning (`read_json(..., missing_ok=True)`), or raises `ResultError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from headlab.errors import HeadlabError
from headlab.heads import HeadRef

SCORES_FILE = "scores.json"
ITEMS_FILE = "items.safetensors"


class ResultError(HeadlabError):
    """A saved result file that cannot be read (corrupt, torn or tampered with)."""


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically: a temp file beside it, flushed and fsynced, then renamed over it.

    A kill at any point leaves the old file or the new one, never half of one (the temp file is removed on an error).

    Args:
        path: the file to write; its folder is created if needed.
        data: the content: a str (written as UTF-8) or bytes.

    Returns:
        `path` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any, *, indent: int = 1) -> Path:
    """Write `obj` as JSON, atomically (`write_atomic`); values JSON cannot hold are written with str().

    Args:
        path: the file to write.
        obj: a JSON-ready value (dicts, lists, numbers, strings; anything else becomes its str()).
        indent: the JSON indentation.

    Returns:
        `path` as a Path.
    """
    return write_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def read_json(path: str | Path, *, missing_ok: bool = False) -> Any:
    """Read a JSON file written by `write_json`.

    Args:
        path: the file.
        missing_ok: treat an absent file as None, and an unreadable one (cut short, edited) as None with a warning
            naming it (a rerun recomputes it), instead of raising.

    Returns:
        The parsed value, or None for an absent or unreadable file with `missing_ok`.

    Raises:
        ResultError: without `missing_ok`, a file that does not exist or is not valid JSON (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise ResultError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if missing_ok:
            warnings.warn(f"{path} is unreadable ({err}); treating it as absent", stacklevel=2)
            return None
        raise ResultError(f"{path} is not valid JSON ({err}): it was cut short or edited; delete it to recompute")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as a safetensors file, atomically (`write_atomic`).

    Args:
        path: the file to write.
        tensors: name -> tensor (detached, made contiguous and copied to the CPU before writing).
        metadata: string -> string metadata stored in the file's header.

    Returns:
        `path` as a Path.
    """
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return write_atomic(path, data)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a safetensors file written by `save_tensors`.

    Args:
        path: the file.

    Returns:
        name -> tensor, on the CPU.

    Raises:
        ResultError: a file that is absent, torn or not safetensors (naming the file).
    """
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise ResultError(f"{path} is not a readable safetensors file ({err}); delete it to recompute") from err


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read the records of a JSON-lines file; a torn or unreadable line is skipped with a warning.

    Args:
        path: the file (absent: no records).

    Returns:
        The records in file order (an empty list for an absent file).
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s) (an interrupted write); they will be recomputed",
                      stacklevel=2)
    return rows


def append_jsonl(path: str | Path, records: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Append records as JSON lines, flushed and fsynced; a torn last line (no newline) is ended first.

    Args:
        path: the file (created with its folder if needed).
        records: one record or a list of them; values JSON cannot hold are written with str().
    """
    path = Path(path)
    records = [records] if isinstance(records, dict) else records
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write("\n" * torn + "".join(json.dumps(r, default=str) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class HeadScores:
    """Named per-head score maps of one analysis.

    Attributes:
        analysis: the analysis that made it (e.g. "induction").
        model: the model's name.
        maps: score maps, each a float tensor `[L, H]`; `primary` names the main one.
        primary: the key of `maps` that `scores`, `top` and `figure` use by default.
        params: the settings that produced it (a params dataclass as a dict).
        meta: facts about the run (model geometry, device, dtype, versions, time, notes).
        items: per-item data (e.g. per-sequence maps `[B, L, H]`, the token ids), saved as safetensors.

    Raises:
        KeyError: a `primary` that is not a key of `maps`.
    """

    analysis: str
    model: str
    maps: dict[str, torch.Tensor]
    primary: str
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    items: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.primary not in self.maps:
            raise KeyError(f"primary map {self.primary!r} not among {sorted(self.maps)}")

    @property
    def scores(self) -> torch.Tensor:
        """The primary map `[L, H]`."""
        return self.maps[self.primary]

    def top(self, k: int = 5, *, map: str | None = None, largest: bool = True) -> list[tuple[HeadRef, float]]:
        """The k highest-scoring (or lowest-scoring) heads of a map, with their scores.

        Args:
            k: how many heads (at most the number of heads in the map).
            map: the key of the map in `maps` (None: the primary map).
            largest: the highest scores first; False: the lowest first. Undefined (NaN) scores come last.

        Returns:
            (head, score) pairs, best first.

        Raises:
            KeyError: a `map` that is not in `maps`.
        """
        scores = self.maps[map or self.primary]
        flat = scores.flatten().nan_to_num(float("-inf") if largest else float("inf"))
        k = min(k, flat.numel())
        values, idx = flat.topk(k, largest=largest)
        n_heads = scores.shape[1]
        return [(HeadRef(int(i) // n_heads, int(i) % n_heads), float(v)) for v, i in zip(values, idx)]

    def figure(self, map: str | None = None):
        """A layer × head heatmap of a map (plotly, `viz.heatmap`).

        Args:
            map: the key of the map in `maps` (None: the primary map).

        Returns:
            A plotly Figure of the `[L, H]` map.

        Raises:
            KeyError: a `map` that is not in `maps`.
        """
        from headlab.viz import heatmap

        key = map or self.primary
        return heatmap(self.maps[key], title=f"{self.analysis}: {key} — {self.model}", colorbar=key)

    def grid_view(self, map: str | None = None):
        """The layer × head grid of a map as self-contained HTML: hover a cell for its value, click to pick its head.

        Args:
            map: the key of the map in `maps` (None: the primary map).

        Returns:
            An `HtmlView` (`headlab.viz.html.grid_view`): it shows inline in Jupyter, `.save(path)` writes a page.

        Raises:
            ResultError: a `map` that is not in `maps`.
        """
        from headlab.viz.html import grid_view

        key = map or self.primary
        if key not in self.maps:
            raise ResultError(f"no map {key!r} in this result: it has {', '.join(sorted(self.maps))}")
        return grid_view(self.maps[key], title=f"{self.analysis}: {key} — {self.model}", colorbar=key)

    def _repr_html_(self) -> str:
        """Jupyter shows scores as the grid of the primary map (`grid_view()`)."""
        return self.grid_view()._repr_html_()

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready summary that `save` writes as `scores.json` (everything but `items`).

        Returns:
            A dict with the analysis, model, primary key, the primary map as `scores`, every map as nested lists,
            the top 10 heads of the primary map as `[name, score]` pairs, params and meta.
        """
        return {
            "analysis": self.analysis,
            "model": self.model,
            "primary": self.primary,
            "scores": self.scores.tolist(),
            "maps": {k: v.tolist() for k, v in self.maps.items()},
            "top": [[str(h), s] for h, s in self.top(10)],
            "params": self.params,
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> Path:
        """Write `items.safetensors`, then `scores.json` (the commit marker), each atomically.

        Args:
            folder: the result's folder (created if needed; files already there are replaced).

        Returns:
            `folder` as a Path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / ITEMS_FILE, self.items)
        write_json(folder / SCORES_FILE, self.to_json())
        return folder

    @staticmethod
    def saved(folder: str | Path) -> bool:
        """Whether `folder` holds a complete, readable HeadScores (an unreadable one warns and counts as absent).

        Args:
            folder: the result's folder.

        Returns:
            True when its `scores.json` reads as JSON and its `items.safetensors` exists.
        """
        folder = Path(folder)
        data = read_json(folder / SCORES_FILE, missing_ok=True)
        if data is None:
            return False
        if not (folder / ITEMS_FILE).is_file():
            warnings.warn(f"{folder} has {SCORES_FILE} but no {ITEMS_FILE}; treating it as absent", stacklevel=2)
            return False
        return True

    @classmethod
    def load(cls, folder: str | Path) -> "HeadScores":
        """Read a HeadScores saved by `save`.

        Args:
            folder: the result's folder.

        Returns:
            The HeadScores, maps as float32 `[L, H]` tensors (no items when `items.safetensors` is absent).

        Raises:
            ResultError: a `scores.json` that is absent, unreadable or not a headlab result, or an unreadable
                `items.safetensors` (naming the file).
        """
        folder = Path(folder)
        data = read_json(folder / SCORES_FILE)
        items_path = folder / ITEMS_FILE
        items = load_tensors(items_path) if items_path.exists() else {}
        try:
            return cls(
                analysis=data["analysis"], model=data["model"], primary=data["primary"],
                maps={k: torch.tensor(v, dtype=torch.float32) for k, v in data["maps"].items()},
                params=data.get("params", {}), meta=data.get("meta", {}), items=items,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ResultError(f"{folder / SCORES_FILE} is not a headlab result ({err!r})") from err


def params_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as a JSON-ready dict.

    Args:
        params: a dataclass instance (an analysis's settings).

    Returns:
        Its fields as a dict, nested dataclasses as dicts and values JSON cannot hold as their str().
    """
    return json.loads(json.dumps(dataclasses.asdict(params), default=str))


def run_meta(model: Any, **extra: Any) -> dict[str, Any]:
    """The facts about a model and environment that every result records (a result's `meta`).

    Args:
        model: the HeadModel that ran.
        extra: further entries, added last (they override the ones above).

    Returns:
        A JSON-ready dict: model class and geometry, causal, device type, dtype, attention backend, the headlab,
        torch and transformers versions, the weights note if any, and the UTC time.
    """
    import transformers

    from headlab.version import __version__

    return {
        "model_class": type(model.hf).__name__,
        "n_layers": model.n_layers, "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads,
        "head_dim": model.head_dim, "causal": model.causal,
        "device": model.device.type, "dtype": str(model.dtype).removeprefix("torch."),
        "backend": model.backend, "numerics": "raw HF weights, no folding or centering",
        "headlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        **({"weights_note": model.note} if getattr(model, "note", "") else {}),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
