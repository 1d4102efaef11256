"""Issue 6's numbers: sink scans of smollm2-135m and minilm-l6, then ACT's head search and evaluation on smollm2-135m.

Usage: python scripts/sinks_report.py [--out DIR] [--skip-calibration] [--min-visible 16] [--search greedy]

Writes per-run folders under --out (scores, items, figures; the calibration folder resumes when rerun), report.md,
and a compact data/sinks/report.json that notebooks/attention_sinks.ipynb shows. SmolLM2's weights are a 4-bit (Q4_1)
dequantisation of the instruct model; every number on it is about those weights.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import headlab as hl
from headlab.analyses.calibration import CalibrationParams, accuracy_figure, calibration_search, table_lines
from headlab.analyses.sinks import DATA, SinkParams, SinkRule, column_figure, sink_scan, summary_lines

MODELS = ("smollm2-135m", "minilm-l6")


def scan(name: str, out: Path) -> dict:
    """Both threshold variants on one model; figures of the default one."""
    model = hl.load(name, device="cpu")
    result = {"model": name, "note": model.note}
    for label, rule in (("absolute", SinkRule()), ("relative", SinkRule(threshold="relative"))):
        scores = sink_scan(model, params=SinkParams(rule=rule), progress=False)
        folder = scores.save(out / f"scan_{name}_{label}")
        m = scores.meta
        result[label] = {"rule": m["rule"], "seconds": m["seconds"], "share_first_sink": m["share_first_sink"],
                         "share_later_sink": m["share_later_sink"], "later_hits": m["later_hits"],
                         "raw_later_hits": m["raw_later_hits"], "raw_later_hits_in_tail": m["raw_later_hits_in_tail"],
                         "sink_tokens": m["sink_tokens"][:10],
                         "top_later_heads": [[str(h), round(v, 3)] for h, v in scores.top(8, map="later_share")],
                         "first_token": m["prompt_tokens"][0][0], "prompt_lengths": m["prompt_lengths"]}
        print("\n".join(summary_lines(scores)), "\n")
        if label == "absolute":
            scores.figure("sink_share").write_html(folder / "heatmap_sink_share.html", include_plotlyjs="cdn")
            head = scores.top(1, map="later_share")[0][0]
            column_figure(scores, head).write_html(folder / f"column_{head}.html", include_plotlyjs="cdn")
            result["sink_share"] = [[round(x, 3) for x in row] for row in scores.maps["sink_share"].tolist()]
    return result


def calibrate(out: Path, min_visible: int, search: str) -> dict:
    """The ACT search and evaluation on smollm2-135m (resumes from its folder under out)."""
    model = hl.load("smollm2-135m", device="cpu")
    params = CalibrationParams()
    params = replace(params, rule=replace(params.rule, min_visible=min_visible), search=search)
    folder = out / (f"calibrate_mv{min_visible}" + ("" if search == "greedy" else f"_{search}"))
    scores = calibration_search(model, params, out=folder)
    scores.save(folder)
    accuracy_figure(scores.meta["tables"], title="ACT calibration — smollm2-135m (4-bit dequantised)").write_html(
        folder / "accuracy.html", include_plotlyjs="cdn")
    scores.figure("sink_strength").write_html(folder / "heatmap_sink_strength.html", include_plotlyjs="cdn")
    lines = table_lines(scores)
    print("\n".join(lines))
    m = scores.meta
    return {"model": "smollm2-135m", "note": model.note, "params": scores.params, "heads": m["heads"],
            "candidates": m["candidates"], "calib_baseline": m["calib_baseline"], "n_calib": m["n_calib_items"],
            "n_eval": m["n_eval_items"], "tables": m["tables"], "step_seconds": m["step_seconds"],
            "tried": {h: round(float(scores.maps["calib_gain"][r.layer, r.head]), 4)
                      for h, r in ((h, hl.HeadRef.parse(h)) for h in m["candidates"])},
            "table_text": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sinks_report"))
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--min-visible", type=int, default=16, help="tail rule of the calibration sink sets")
    parser.add_argument("--search", choices=("greedy", "independent"), default="greedy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"scans": {}, "seconds": {}}
    for model_name in MODELS:
        start = time.perf_counter()
        report["scans"][model_name] = scan(model_name, args.out)
        report["seconds"][f"scan_{model_name}"] = round(time.perf_counter() - start, 1)
    if not args.skip_calibration:
        start = time.perf_counter()
        report["calibration"] = calibrate(args.out, args.min_visible, args.search)
        report["seconds"]["calibration"] = round(time.perf_counter() - start, 1)
    default = args.min_visible == 16 and args.search == "greedy"
    name = "report_scans.json" if args.skip_calibration else (
        "report.json" if default else f"report_mv{args.min_visible}_{args.search}.json")
    for path in (args.out / name, DATA / name):
        path.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / name} and {DATA / name}; seconds: {report['seconds']}")


if __name__ == "__main__":
    main()
