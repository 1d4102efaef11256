#!/usr/bin/env python
"""Train the bundled ``toy-induction`` model (a few minutes on CPU).

    python scripts/train_toy_induction.py            # writes data/toy-induction/
    python scripts/train_toy_induction.py --out /tmp/toy --seed 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headlab.models.toy import TOY_INDUCTION_DIR, train_toy_induction


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOY_INDUCTION_DIR, help=f"output folder (default {TOY_INDUCTION_DIR})")
    ap.add_argument("--seed", type=int, default=0, help="seed for init and data (default 0)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    kwargs = {"seed": args.seed, "progress": not args.no_progress}
    m = train_toy_induction(args.out, **kwargs)
    ev = m["eval"]
    print(json.dumps(
        {
            "out": str(args.out),
            "final_loss": m["final_loss"],
            "first_copy_loss": ev["first_copy_loss"],
            "second_copy_loss": ev["second_copy_loss"],
            "prev_token_score": ev["prev_token_score"],
            "induction_score": ev["induction_score"],
            "heads": m["heads"],
            "by_length": m["eval_by_length"],
            "train_seconds": m["train_seconds"],
        },
        indent=2,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
