"""The core issue's numbers: induction heads and the loss effect of ablating them, on toy-induction and smollm2-135m.

Usage: python scripts/core_report.py [--out runs/core_report.json] [--draws 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import headlab as hl
from headlab.analyses.induction import InductionParams, copy_losses, induction_scan


def second_copy_loss(model, tokens, seq_len, edits=()):
    with hl.edit(model, list(edits)):
        return copy_losses(model.token_losses(tokens), seq_len)["loss_second_copy"]


def report(name, params, draws, seed=0):
    model = hl.load(name, device="cpu")
    start = time.perf_counter()
    scores = induction_scan(model, params, progress=False)
    scan_s = time.perf_counter() - start
    tokens = scores.items["tokens"]
    top = scores.top(5)
    top3 = [h for h, _ in top[:3]]
    gen = torch.Generator().manual_seed(seed)
    others = [h for h in model.heads() if h not in top3]
    random_losses = []
    for _ in range(draws):
        pick = [others[i] for i in torch.randperm(len(others), generator=gen)[:3]]
        random_losses.append((", ".join(map(str, pick)), second_copy_loss(model, tokens, params.seq_len,
                                                                          hl.ablate(pick))))
    combined = scores.maps["induction"] + scores.maps["prev_token"]
    control = min(model.heads(), key=lambda h: float(combined[h.layer, h.head]))
    out = {
        "model": name, "note": model.note, "params": scores.params, "scan_seconds": round(scan_s, 2),
        "top_induction": [[str(h), round(s, 4)] for h, s in top],
        "top_prev_token": [[str(h), round(s, 4)] for h, s in scores.top(5, map="prev_token")],
        "loss_first_copy": scores.meta["loss_first_copy"],
        "loss_second_copy": second_copy_loss(model, tokens, params.seq_len),
        "loss_second_copy_top1_ablated": second_copy_loss(model, tokens, params.seq_len, hl.ablate(top3[0])),
        "loss_second_copy_top3_ablated": second_copy_loss(model, tokens, params.seq_len, hl.ablate(top3)),
        "control_head": str(control),
        "loss_second_copy_control_ablated": second_copy_loss(model, tokens, params.seq_len, hl.ablate(control)),
        "loss_second_copy_random3_ablated": random_losses,
    }
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/core_report.json"))
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [
        report("toy-induction", InductionParams(batch=32), args.draws),
        report("smollm2-135m", InductionParams(seq_len=40, batch=16), args.draws),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
