"""Self-contained HTML views: a JSON payload in a `data-headlab` attribute plus the inline renderer.

An `HtmlView` renders inline in Jupyter (`_repr_html_`: the markup and a `<script>` that draws it; JupyterLab runs
the scripts of trusted outputs, which a notebook's own executed cells are), saves as a standalone page (`save`), and
gives the explorer its markup alone (`markup`, drawn by the renderer that the app loads once with `js_on_load`).
Nothing is fetched: no CDN, no server. The payload is HTML-escaped into the attribute (`html.escape`, quotes
included) and the renderer only ever writes token text with `textContent`.
"""

from __future__ import annotations

import html
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headlab.errors import HeadlabError
from headlab.viz.html.script import RENDERER_JS

SCALE = 10_000  # weights travel as integers round(w * SCALE): exact to 4 decimals
"""Weights travel in a payload as the integers round(w · SCALE): exact to 4 decimals."""
_ATTR = re.compile(r'data-headlab="([^"]*)"')


class ViewError(HeadlabError, ValueError):
    """Data a view cannot show (mismatched shapes, statistics without top-k keys, a bad label list)."""


class ViewTooLarge(ViewError):
    """A view whose payload would exceed its byte budget (ask for fewer heads, or the statistics view)."""


@dataclass
class HtmlView:
    """One HTML view: its kind ("tokens", "stats" or "grid"), its JSON payload and a fallback line.

    Attributes:
        payload: the data the renderer draws (JSON-ready: lists, ints, floats rounded to 4 decimals, None for NaN).
        summary: one line of text shown where scripts do not run (an untrusted notebook).
    """

    payload: dict[str, Any]
    summary: str = ""
    _json: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        self._json = json.dumps(self.payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    @property
    def kind(self) -> str:
        """The view's kind, from its payload: "tokens" (dense), "stats" (statistics) or "grid"."""
        return self.payload["kind"]

    @property
    def nbytes(self) -> int:
        """Size of the escaped payload in bytes (what travels to the browser besides the ~15 kB renderer)."""
        return len(html.escape(self._json, quote=True))

    def with_payload(self, **changes: Any) -> "HtmlView":
        """The same view with some payload fields changed (e.g. `note`, or `focus`: the head shown first).

        Args:
            changes: payload fields to set (JSON-ready values).

        Returns:
            A new HtmlView with the same summary (this one is unchanged).
        """
        return HtmlView({**self.payload, **changes}, self.summary)

    def markup(self, element_id: str | None = None) -> str:
        """The view's `<div>` only (no script): for a page that loads the renderer itself (the explorer).

        Args:
            element_id: an `id` attribute for the `<div>` (None: none).

        Returns:
            The `<div class="headlab-view">` with the escaped payload in its `data-headlab` attribute and the summary
            as its fallback text.
        """
        ident = f' id="{element_id}"' if element_id else ""
        fallback = html.escape(self.summary or f"headlab {self.kind} view")
        return (f'<div class="headlab-view"{ident} data-headlab="{html.escape(self._json, quote=True)}">'
                f"{fallback} (the interactive view needs JavaScript: in Jupyter, trust the notebook)</div>")

    @property
    def html(self) -> str:
        """The markup and an inline script that draws it: a fragment that works on its own."""
        ident = f"headlab-view-{uuid.uuid4().hex[:12]}"
        return (self.markup(ident) + f"<script>{RENDERER_JS}\nwindow.__headlabView.render("
                f"document.getElementById('{ident}'));</script>")

    def _repr_html_(self) -> str:
        return self.html

    def document(self) -> str:
        """A standalone HTML page holding the view.

        Returns:
            The page: the view's markup and the inline renderer, titled by the payload's title.
        """
        title = html.escape(str(self.payload.get("title") or f"headlab {self.kind} view"))
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
                f"<body>\n{self.html}\n</body></html>\n")

    def save(self, path: str | Path) -> Path:
        """Write the view as a standalone page (`document()`), atomically.

        Args:
            path: the `.html` file to write (its folder is created if needed).

        Returns:
            `path` as a Path.
        """
        from headlab.results import write_atomic  # results sits beside viz; imported late to keep viz light

        return write_atomic(Path(path), self.document())

    def __repr__(self) -> str:
        return f"HtmlView({self.kind}: {self.summary or self.payload.get('title', '')}, {self.nbytes:,} bytes)"


def read_payload(page: str) -> dict[str, Any]:
    """The payload of the (first) view in an HTML string: the inverse of the escaping done here (tests, tools).

    Args:
        page: HTML holding a view (`HtmlView.html`, `markup()` or `document()`).

    Returns:
        The view's payload, as parsed from its `data-headlab` attribute.

    Raises:
        ValueError: HTML without a headlab view.
    """
    match = _ATTR.search(page)
    if match is None:
        raise ValueError("no headlab view (data-headlab attribute) in this HTML")
    return json.loads(html.unescape(match.group(1)))


def rounded(values: Any, digits: int = 4) -> Any:
    """Floats (nested lists) rounded to `digits` decimals; NaN and infinities become None (JSON has neither)."""
    if isinstance(values, list):
        return [rounded(v, digits) for v in values]
    values = float(values)
    return round(values, digits) if math.isfinite(values) else None


def check_budget(nbytes: int, max_bytes: int | None, what: str, advice: str) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise ViewTooLarge(f"{what}: {nbytes:,} bytes of data is over the view's budget of {max_bytes:,} bytes; "
                           f"{advice}")
