"""Collect `headlab circuit` runs into the committed summary (benchmarks/results/circuits_smollm2/).

    python scripts/circuits_report.py RUNS_DIR [--out benchmarks/results/circuits_smollm2]

RUNS_DIR holds one `headlab circuit discover` folder per task (ioi with --atp), `reuse/` (`circuit compare`) and
`repair/` (`circuit repair`); see the commands in the summary. Composition scores are computed here (seconds) and
scored against the path-patching edges of each circuit (precision at k = the number of edges found).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import headlab as hl
from headlab.circuits import Circuit, load_comparison
from headlab.circuits.composition import composition_scores, precision_at_k
from headlab.results import HeadScores, read_json, write_json

COMMANDS = [
    "headlab circuit discover --task ioi --out runs/ioi --n 100 --atp",
    "for t in induction gendered_pronoun greater_than docstring colored_objects; do "
    "headlab circuit discover --task $t --out runs/$t --n 100; done",
    "headlab circuit compare runs/ioi runs/induction runs/gendered_pronoun runs/greater_than runs/docstring "
    "runs/colored_objects --out runs/reuse",
    "headlab circuit repair --circuit runs/ioi --task colored_objects --out runs/repair --n 200",
    "python scripts/circuits_report.py runs",
]
EDGE_THRESHOLD = 0.02  # |path-patching effect| that counts as an edge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits_smollm2"))
    args = p.parse_args()
    torch.set_num_threads(2)
    circuits = {}
    for folder in sorted(args.runs.iterdir()):
        if (folder / "circuit.json").exists():
            circuits[folder.name] = Circuit.load(folder)
    if not circuits:
        raise SystemExit(f"no circuit folders in {args.runs}")
    model = hl.load(next(iter(circuits.values())).model)
    comp = composition_scores(model, progress=False)
    summary: dict = {"model": model.name, "note": model.note, "commands": COMMANDS, "tasks": {}}
    for name, c in circuits.items():
        patching = HeadScores.load(args.runs / name / "patching")
        heads = {h.head for h in c.heads}
        edges = {(e.sender, e.receiver, e.channel) for e in c.edges if abs(e.effect) >= EDGE_THRESHOLD}
        k = len(edges)
        prec = precision_at_k(comp, edges, k, senders=heads, receivers=heads) if k else None
        random_prec = None
        if k:
            pairs = [(s, r) for s in heads for r in heads if r.layer > s.layer]
            random_prec = k / (3 * len(pairs)) if pairs else None
        entry = {
            "accuracy_clean": c.meta["accuracy_clean"], "accuracy_corrupt": c.meta["accuracy_corrupt"],
            "ld_clean": c.meta["ld_clean"], "ld_corrupt": c.meta["ld_corrupt"], "n": c.meta["n_prompts"],
            "seconds_patching": c.meta["seconds_patching"], "fraction": c.fraction,
            "heads": [h.to_json() for h in sorted(c.heads, key=lambda h: -abs(h.effect))],
            "roles": c.roles(),
            "n_strong_heads": {f">{t}": int((patching.maps["effect"].abs() > t).sum()) for t in (0.01, 0.1)},
            "edges": sorted([e.to_json() for e in c.edges if abs(e.effect) >= EDGE_THRESHOLD],
                            key=lambda e: -abs(e["effect"]))[:15],
            "n_edges": k, "composition_precision_at_k": prec, "composition_random_precision": random_prec,
        }
        agreement = args.runs / name / "agreement.json"
        if agreement.exists():
            entry["agreement"] = read_json(agreement)
        summary["tasks"][name] = entry
    if (args.runs / "reuse" / "comparison.json").exists():
        comparison = load_comparison(args.runs / "reuse")
        summary["reuse"] = {str(f): comparison.table(f) for f in sorted({p.fraction for p in comparison.pairs})}
    if (args.runs / "repair" / "repair.json").exists():
        summary["repair"] = read_json(args.runs / "repair" / "repair.json")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}, indent=1, default=str)[:4000])
    for name, entry in summary["tasks"].items():
        print(name, {k: entry[k] for k in ("accuracy_clean", "roles", "n_edges", "composition_precision_at_k",
                                           "composition_random_precision")})


if __name__ == "__main__":
    main()
