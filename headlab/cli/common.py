"""What every `headlab` command shares: model arguments and loading, list arguments, sink-rule arguments, figures.

The only place (with the command modules beside it) that holds argparse code: library modules take parameter
objects, never an `argparse.Namespace`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

MODEL_HELP = "bundled name (smollm2-135m, minilm-l6, toy-induction, twin-...) or a local HF folder"


# argparse types: every bad value is a one-line usage error naming the option


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def count(text: str) -> int:
    """An integer >= 1 (sizes, lengths, steps, threads)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def natural(text: str) -> int:
    """An integer >= 0 (seeds, indices)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: the first free one)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0..65535)")
    return value


def finite(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not finite")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be greater than 0")
    return value


def nonnegative(text: str) -> float:
    """A finite number >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be 0 or more")
    return value


def unit(text: str) -> float:
    """A fraction in (0, 1]."""
    value = finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} must lie in (0, 1]")
    return value


def percent(text: str) -> float:
    """A percentage, 0..100."""
    value = finite(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value:g} must lie in 0..100")
    return value


def layer_range(text: str) -> tuple[int, int]:
    """LO:HI, an inclusive layer range with 0 <= LO <= HI."""
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI")
    lo, hi = natural(parts[0]), natural(parts[1])
    if lo > hi:
        raise argparse.ArgumentTypeError(f"{text}: LO must not exceed HI")
    return lo, hi


def add_model_args(p: argparse.ArgumentParser, *, default: str = "smollm2-135m", help: str = MODEL_HELP) -> None:
    """--model, --device, --dtype."""
    p.add_argument("--model", default=default, help=help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def check_out(path: Path) -> Path:
    """Refuse an --out that cannot become a folder, before any work is done (nothing is created here)."""
    from headlab.errors import HeadlabError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HeadlabError(f"--out {path} is a file, not a folder")
    parent = next((p for p in [path, *path.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise HeadlabError(f"--out {path}: {parent} is not writable")
    return path


def load_model(args: argparse.Namespace, *, show: bool = True):
    """The HeadModel the model arguments name (printed, with its note, unless show=False); --out is checked first."""
    import headlab as hl

    if getattr(args, "out", None) is not None:
        check_out(args.out)
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


def add_executor_args(p: argparse.ArgumentParser, *, units: str, note: str = "") -> None:
    """Add `--executor local|ray|ray:ADDRESS`, `--workers` and `--worker-threads` (`headlab.executors`).

    Args:
        p: the command's parser.
        units: what the command's independent units are, for the help text (e.g. "the needle trials").
        note: a sentence appended to the help.
    """
    p.add_argument("--executor", default="local", metavar="local|ray|ray:ADDRESS",
                   help=f"where {units} run: this process (default), a local Ray cluster (ray), or a running one "
                        f"(ray:auto, ray:ray://HEAD:10001); each Ray worker loads the model once{note}")
    p.add_argument("--workers", type=count, default=2, help="Ray workers (actors) to start")
    p.add_argument("--worker-threads", type=count, default=1, help="torch threads per Ray worker")


def executor_from_args(args: argparse.Namespace):
    """The executor `add_executor_args`' options name (checked before any model is loaded).

    Args:
        args: the parsed arguments.

    Returns:
        A `headlab.executors` LocalExecutor or RayExecutor.

    Raises:
        ExecutorError: an unknown `--executor`.
    """
    from headlab.executors import parse_executor

    return parse_executor(args.executor, workers=args.workers, threads=args.worker_threads)


def add_rule_args(p: argparse.ArgumentParser, *, min_visible: int) -> None:
    """The SinkRule options (scan sinks, calibrate)."""
    p.add_argument("--threshold", choices=("absolute", "relative"), default="absolute",
                   help="absolute: s_j > tau (ACT's code); relative: s_j > alpha/N")
    p.add_argument("--tau", type=positive, default=0.1)
    p.add_argument("--alpha", type=positive, default=5.0,
                   help="factor of the relative threshold (unconfirmed in the paper)")
    p.add_argument("--min-visible", type=count, default=min_visible,
                   help="tail rule: a sink must be seen by this many queries (1: off, as in ACT's code)")


def rule_from_args(args: argparse.Namespace):
    from headlab.sink_rule import SinkRule

    return SinkRule(threshold=args.threshold, tau=args.tau, alpha=args.alpha, min_visible=args.min_visible)


def write_figure(fig: Any, path: Path) -> Path:
    """A plotly figure as a standalone HTML file (plotly.js from its CDN)."""
    fig.write_html(path, include_plotlyjs="cdn")
    return path
