"""The retrieval-head report on a real model: `headlab scan retrieval` plus the tables behind its figures.

    python scripts/retrieval_report.py --model smollm2-135m --out runs/retrieval-smollm2 \\
        --lengths 512 1024 2048 4096 --depths 10 50 90

Takes the same arguments as `headlab scan retrieval` (it calls the same code, so a rerun resumes
from `<out>/trials.jsonl`), then prints the baseline recall by length × depth, the masking test by
K, and RazorAttention's KV fraction and recall by length, from the saved per-trial records.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from headlab.cli import build_parser


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def tables(out: Path) -> None:
    """Print recall by length × depth, the masking test, and KV fraction / recall by length and condition."""
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines() if line.endswith("}")]
    latest = {r["condition"]: r["spec"] for r in rows}  # a condition rerun with other settings: its latest spec
    recs = [r for r in rows if r["spec"] == latest[r["condition"]]]
    lengths, depths = sorted({r["length"] for r in recs}), sorted({r["depth"] for r in recs})
    base = [r for r in recs if r["condition"] == "baseline"]
    print("\nbaseline recall (found/total) by length × depth:")
    print("  length " + "".join(f"{d:>12g}" for d in depths) + "   mean  decode s")
    for n in lengths:
        cells = [[r for r in base if r["length"] == n and r["depth"] == d] for d in depths]
        row = "".join(f"{_mean([r['recall'] for r in c]):6.2f} ({sum(r['found'] for r in c)}/{len(c)})" for c in cells)
        at = [r for r in base if r["length"] == n]
        print(f"  {n:6d} {row}  {_mean([r['recall'] for r in at]):5.2f}  {_mean([r['seconds'] for r in at]):6.1f}")
    names = sorted({r["condition"] for r in recs})
    print("\nrecall and KV kept by condition and length:")
    print(f"  {'condition':<22}" + "".join(f"{n:>14}" for n in lengths) + "       all")
    for name in names:
        cells = [[r for r in recs if r["condition"] == name and r["length"] == n] for n in lengths]
        kv = [_mean([r["kv"]["fraction"] for r in c if "kv" in r]) if any("kv" in r for r in c) else 1.0 for c in cells]
        row = "".join(f"  {_mean([r['recall'] for r in c]):4.2f} ({k:5.1%})" for c, k in zip(cells, kv))
        print(f"  {name:<22}{row}  {_mean([r['recall'] for r in recs if r['condition'] == name]):8.3f}")
    print("\nbaseline replies at the middle depth:")
    mid = depths[len(depths) // 2]
    for r in sorted((r for r in base if r["depth"] == mid), key=lambda r: (r["needle"], r["length"])):
        print(f"  needle {r['needle']} L{r['length']}: recall {r['recall']:.2f} {r['reply'][:90]!r}")


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = build_parser().parse_args(["scan", "retrieval", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    code = args.handler(args)
    tables(args.out)
    print(f"\nreport done in {time.perf_counter() - start:.0f} s (cached trials are not rerun)")
    return code


if __name__ == "__main__":
    sys.exit(main())
