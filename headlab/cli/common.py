"""What every `headlab` command shares: model arguments and loading, list arguments, sink-rule arguments, figures.

The only place (with the command modules beside it) that holds argparse code: library modules take parameter
objects, never an `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

MODEL_HELP = "bundled name (smollm2-135m, minilm-l6, toy-induction, twin-...) or a local HF folder"


def add_model_args(p: argparse.ArgumentParser, *, default: str = "smollm2-135m", help: str = MODEL_HELP) -> None:
    """--model, --device, --dtype."""
    p.add_argument("--model", default=default, help=help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def load_model(args: argparse.Namespace, *, show: bool = True):
    """The HeadModel the model arguments name (printed, with its note, unless show=False)."""
    import headlab as hl

    model = hl.load(args.model, device=args.device, dtype=args.dtype)
    if show:
        print(model)
        if model.note:
            print(f"note: {model.note}")
    return model


def split_list(values: str | list[str]) -> tuple[str, ...]:
    """Repeated and/or comma-separated values → a tuple without duplicates, in order."""
    out: list[str] = []
    for v in [values] if isinstance(values, str) else values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return tuple(dict.fromkeys(out))


def choose(value: str, allowed, what: str) -> list[str]:
    """Comma-separated names, each one of `allowed` (a HeadlabError naming the bad ones otherwise)."""
    from headlab.errors import HeadlabError

    items = list(split_list(value))
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise HeadlabError(f"unknown {what} {bad or value!r}: choose from {', '.join(allowed)}")
    return items


def add_rule_args(p: argparse.ArgumentParser, *, min_visible: int) -> None:
    """The SinkRule options (scan sinks, calibrate)."""
    p.add_argument("--threshold", choices=("absolute", "relative"), default="absolute",
                   help="absolute: s_j > tau (ACT's code); relative: s_j > alpha/N")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=5.0,
                   help="factor of the relative threshold (unconfirmed in the paper)")
    p.add_argument("--min-visible", type=int, default=min_visible,
                   help="tail rule: a sink must be seen by this many queries (1: off, as in ACT's code)")


def rule_from_args(args: argparse.Namespace):
    from headlab.sink_rule import SinkRule

    return SinkRule(threshold=args.threshold, tau=args.tau, alpha=args.alpha, min_visible=args.min_visible)


def write_figure(fig: Any, path: Path) -> Path:
    """A plotly figure as a standalone HTML file (plotly.js from its CDN)."""
    fig.write_html(path, include_plotlyjs="cdn")
    return path
