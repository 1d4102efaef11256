"""The `headlab` command: `info`, `explore`, `scan induction|sinks|retrieval`, `calibrate`, `prune`, `icl train|report`,
`train twins|toy`, `circuit discover|repair|compare`, `moh convert|train|analyse|twin`, `linearize build|analyse`.

One module per command group (`headlab/cli/<group>.py`, each with `register(subparsers)` and its `cmd_*` handlers);
`common.py` holds the shared model arguments, loading and figure writing. This package is the only place with
argparse code: the library takes parameter objects.
"""

from __future__ import annotations

import argparse
import sys

from headlab.errors import HeadlabError


def build_parser() -> argparse.ArgumentParser:
    """The whole `headlab` parser; each subcommand sets its `handler`."""
    from headlab.cli import calibrate, circuit, explore, icl, info, linearize, moh, prune, scan, train

    parser = argparse.ArgumentParser(prog="headlab", description="Study, score and edit attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (info, scan, explore, calibrate, circuit, icl, moh, linearize, prune, train):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (HeadlabError, ValueError) as err:  # what a user can get wrong: named by the library, never a traceback
        print(f"headlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out is a file, a read-only folder, a missing input file ...
        print(f"headlab: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nheadlab: interrupted; rerun the same command to resume where results were written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
