#!/usr/bin/env python
"""Train the short-convolution MQAR twins in this folder (kernel 4, every twin kind, widths 64 and 128), resumably.

    OMP_NUM_THREADS=1 python data/mqar-twins/train_conv.py >> data/mqar-twins/train_conv.log 2>&1 &

One recipe for all (`TwinParams.for_task("mqar", kind, short_conv=4, hidden=...)`, as the no-conv rows but for the
convolution); models already here (with run.json) are skipped, so a rerun resumes. The narrow models first, so every
kind has one point before the wide ones start; BASED last within a width (its 1 + d + d² Taylor features make it by
far the slowest on a CPU). Rewrites summary.json / README.md after each model.
"""

import sys
import time

import torch

from headlab.models.linear.config import STACKS
from headlab.models.linear.mqar_twins import train_mqar_twins

KERNEL = 4
HIDDENS = (64, 128)

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1] if len(sys.argv) > 1 else "data/mqar-twins"
    kinds = [k for k in STACKS if k != "based"] + ["based"]
    for hidden in HIDDENS:
        for kind in kinds:
            t0 = time.time()
            print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC start {kind} conv{KERNEL} h{hidden}", flush=True)
            summary = train_mqar_twins(out, kinds=[kind], hiddens=[hidden], short_conv=KERNEL, threads=1,
                                       progress=False)
            name = f"{kind}-conv{KERNEL}-h{hidden}"
            m = summary["models"][name]
            print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC done {name} in {time.time() - t0:.0f} s "
                  f"(train {m['train_seconds']} s): accuracy {m['accuracy']}, train dist. "
                  f"{m['train_distribution_accuracy']:.4f}, final loss {m['final_train_loss']}", flush=True)
