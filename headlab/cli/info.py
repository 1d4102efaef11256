"""`headlab info`: a model's head geometry."""

from __future__ import annotations

import argparse

from headlab.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("info", help="print a model's head geometry")
    add_model_args(p)
    p.set_defaults(handler=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    load_model(args)
    return 0
