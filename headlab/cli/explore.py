"""`headlab explore`: the Gradio head explorer (apps/explorer.py wires headlab.explore's logic)."""

from __future__ import annotations

import argparse
from pathlib import Path

from headlab.cli.common import MODEL_HELP, count, port


def register(sub) -> argparse.ArgumentParser:
    """Add `headlab explore --model NAME_OR_PATH [--host] [--port] [--max-tokens]`."""
    from headlab.explore import DEFAULT_MODEL, ExplorerSettings

    p = sub.add_parser("explore", help="open the Gradio head explorer (local only, no share link)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860; 0: the first free one from 7860)")
    p.add_argument("--max-tokens", type=count, default=ExplorerSettings.max_tokens, help="longest prompt analysed")
    p.add_argument("--allow-folders", action="store_true",
                   help="let clients load any local HF folder on this server by typing its path (default: only the "
                        "bundled names and --model)")
    p.add_argument("--circuit", type=Path, default=None,
                   help="a folder written by `headlab circuit discover`: shown in the Circuit tab (its model is loaded "
                        "on demand)")
    p.add_argument("--max-models", type=count, default=ExplorerSettings.max_models,
                   help="models kept loaded at once (least recently used dropped first)")
    p.add_argument("--report", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder written by a headlab command (scan, calibrate, prune, icl train, circuit discover, "
                        "moh convert|analyse, linearize analyse ...): opened in the Reports tab at launch; repeatable")
    p.add_argument("--reports-root", type=Path, action="append", default=None, metavar="DIR",
                   help="a folder whose report folders the Reports tab's picker lists; repeatable (default: the "
                        "--report folders and the repo's runs/ folder). Clients pick from that list; any other "
                        "folder only with --allow-folders")
    p.set_defaults(handler=cmd_explore)
    return p


def cmd_explore(args: argparse.Namespace) -> int:
    """Load the model once and warm it up, then serve the explorer until interrupted."""
    from headlab.explore import Explorer, ExplorerSettings, load_app_module

    import ipaddress
    import sys

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"headlab: warning: binding {args.host} serves the explorer beyond this machine: anyone who can reach "
              f"port {args.port} can run models here{'' if not args.allow_folders else ' and load any folder'}",
              file=sys.stderr)
    from headlab.explore.reports import ReportLibrary

    reports = ReportLibrary(args.report, roots=args.reports_root, allow_folders=args.allow_folders)
    for folder in args.report:  # checked (and cached) before anything is served: a bad folder is named now
        reports.open(folder)
    app = load_app_module()
    circuit = None
    allowed = [args.model]
    if args.circuit is not None:
        from headlab.circuits.circuit import Circuit

        allowed.append(Circuit.load(args.circuit).model)  # checked before anything is served
    explorer = Explorer(ExplorerSettings(max_tokens=args.max_tokens, allowed=tuple(allowed),
                                         allow_folders=args.allow_folders, max_models=args.max_models))
    if args.circuit is not None:
        from headlab.circuits.view import CircuitView

        circuit = CircuitView.open(args.circuit, explorer.cache.get)
    print(f"loading {args.model} ...", flush=True)
    explorer.open_model(args.model, "", True, "induction", -1, None)  # load and warm up before the first page
    demo = app.build_app(explorer, model=args.model, circuit=circuit, reports=reports)
    app.launch(demo, host=args.host, port=args.port or None, block=True)
    return 0
