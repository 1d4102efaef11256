"""Helpers the generated documentation pages share (scripts/docs_gen.py, docs_tutorials.py, docs_repro.py)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fence(code: str, lang: str = "python") -> str:
    ticks = "```"
    while ticks in code:
        ticks += "`"
    return f"{ticks}{lang}\n{code.rstrip()}\n{ticks}"


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    """A table cell: a pipe would split the cell, inside a code span or not, so it is written as an entity (a code
    span becomes a <code> element holding the entity)."""
    if "|" not in text:
        return text
    if text.startswith("`") and text.endswith("`") and text.count("`") == 2:
        return "<code>" + html.escape(text[1:-1]).replace("|", "&#124;") + "</code>"
    return text.replace("|", "&#124;")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(_cell, r)) + " |" for r in rows], ""]


def _read(rel: str):
    return json.loads((ROOT / rel).read_text())


def _source(rel: str, command: str) -> list[str]:
    return [f"Source: `{rel}`. Reproduce:", "", _fence(command, "bash"), ""]


def _head(key: str) -> str:
    """'1.0' (layer.head, as training.json writes heads) → L1H0."""
    layer, head = key.split(".")
    return f"L{layer}H{head}"
