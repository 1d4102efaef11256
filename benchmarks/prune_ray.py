"""A pruning sweep on SmolLM2-135M run serially and on a local Ray cluster, with one Ray worker killed mid-run.

  serial   prune_experiment in this process (1 torch thread)
  ray      the same sweep on a local Ray cluster of --workers actors (1 thread each; each loads the model once);
           after the first finished unit, one worker's process is killed with SIGKILL (the actor restarts and its
           unfinished units are retried)

Reported: wall times (the ray one includes starting the cluster and loading the model in every worker), whether the
rows are identical (metrics and removed heads of every ranker × fraction × eval), and that each row was written once.

Usage: python benchmarks/prune_ray.py [--workers 2] [--out benchmarks/results/prune_ray_cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import torch

    import headlab as hl
    from headlab.executors import RayExecutor
    from headlab.prune.experiment import PruneParams, prune_experiment, read_rows

    torch.set_num_threads(1)
    model = hl.load("smollm2-135m")
    params = PruneParams(rankers=("random", "induction", "sink"), fractions=(0.0, 0.1, 0.25, 0.5),
                         evals=(f"ppl:{ROOT / 'data/text/kjv-john.txt'}",), ctx=128, windows=4)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    prune_experiment(model, params, tmp / "serial", progress=False)
    serial_s = time.perf_counter() - t0

    class KillOne(RayExecutor):
        def run(self, factory, jobs, on_result):
            self.killed = None

            def first(job, result):
                if self.killed is None:
                    self.killed = self.pids[0]
                    os.kill(self.killed, signal.SIGKILL)
                on_result(job, result)
            super().run(factory, jobs, first)

    executor = KillOne(workers=args.workers)
    # rankings are computed once by the driver; reuse the serial run's so both time the same units
    (tmp / "ray").mkdir()
    for name in ("run.json", "rankings"):
        os.system(f"cp -r {tmp / 'serial' / name} {tmp / 'ray' / name}")
    t0 = time.perf_counter()
    prune_experiment(model, params, tmp / "ray", progress=False, executor=executor)
    ray_s = time.perf_counter() - t0

    def rows(folder):
        return {(r["ranker"], r["fraction"]): (r["metrics"], r["removed"]) for r in read_rows(folder)}
    lines = (tmp / "ray" / "results.jsonl").read_text().splitlines()
    keys = [(json.loads(x)["ranker"], json.loads(x)["fraction"]) for x in lines]
    report = "\n".join([
        f"# pruning sweep, smollm2-135m, serial vs a local Ray cluster — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# rankers {', '.join(params.rankers)}; fractions {params.fractions}; eval ppl kjv-john (4 × 128 tokens)",
        f"serial (1 thread): {serial_s:.1f} s",
        f"ray ({args.workers} workers × 1 thread, cluster start and model loads included): {ray_s:.1f} s",
        f"worker process {executor.killed} killed with SIGKILL after the first result",
        f"rows identical to the serial run: {rows(tmp / 'serial') == rows(tmp / 'ray')} ({len(keys)} rows, "
        f"{len(set(keys))} distinct: each written once: {len(keys) == len(set(keys))})",
    ]) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
