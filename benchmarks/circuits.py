"""Patching cost on SmolLM2: exact patching of every head (layers rerun from the patched one, heads of a layer side by
side, prompts bucketed by length) against the naive way (one full padded forward per head), and the fast screens AtP
and AtP* (with GradDrop), all measured in one run on one task.

    python benchmarks/circuits.py [--task ioi] [--n 100] [--threads 2] [--out benchmarks/results/circuits_cpu.txt]

The naive way is timed on a sample of heads (one per layer, spread over heads) and scaled to all heads; everything
else is timed whole. Timings on a shared machine are noisy: compare the ratios printed side by side.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import headlab as hl
from headlab.circuits import agreement, atp, atp_star, exact_patching, prepare
from headlab.heads import HeadRef
from headlab.tasks.circuits import make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="ioi")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/circuits_cpu.txt"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = hl.load(args.model)
    task = make_task(args.task, model.tokenizer, args.n, seed=0)
    lines = [f"# python benchmarks/circuits.py --task {args.task} --n {args.n} --threads {args.threads}",
             f"# {model.name}, task {args.task}, {args.n} prompt pairs, fp32, {args.threads} threads, "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}; times are wall clock on a "
             "shared 2-core machine (ratios are side by side in one run)"]

    t = time.perf_counter()
    prep = prepare(model, task)
    t_prepare = time.perf_counter() - t
    n_heads = model.n_layers * model.n_heads

    t = time.perf_counter()
    exact = exact_patching(model, prep, progress=True)
    t_exact = time.perf_counter() - t

    sample = [HeadRef(layer, layer % model.n_heads) for layer in range(model.n_layers)]
    rows = torch.arange(len(prep.end))
    t = time.perf_counter()
    worst = 0.0
    for head in sample:
        with torch.no_grad(), hl.edit(model, hl.Patch(head, z=prep.corrupt_run.z(head))):
            logits = model.hf(input_ids=prep.clean.input_ids, attention_mask=prep.clean.attention_mask).logits
        picked = logits[rows, prep.end].gather(1, prep.tokens)
        worst = max(worst, float((picked[:, 0] - picked[:, 1] - exact.items["ld"][head.layer, head.head]).abs().max()))
    t_naive = (time.perf_counter() - t) / len(sample) * n_heads

    t = time.perf_counter()
    plain = atp(model, prep)
    t_atp = time.perf_counter() - t
    t = time.perf_counter()
    star = atp_star(model, prep)
    t_star = time.perf_counter() - t

    lines += [
        f"prepare (clean + corrupted runs, layer inputs per length bucket): {t_prepare:.1f} s",
        f"exact patching, all {n_heads} heads: {t_exact:.1f} s",
        f"naive (one full forward per head, scaled from {len(sample)} heads): {t_naive:.1f} s  "
        f"-> exact is x{t_naive / t_exact:.2f} faster; max |LD difference| on the sample {worst:.1e}",
        f"AtP: {t_atp:.1f} s (x{t_atp / t_exact:.3f} of exact)",
        f"AtP* with GradDrop ({model.n_layers} extra backward passes): {t_star:.1f} s (x{t_star / t_exact:.3f} of exact)",
        f"agreement with exact, AtP:  {agreement(exact, plain)}",
        f"agreement with exact, AtP*: {agreement(exact, star)}",
        f"agreement with exact, GradDrop magnitude: {agreement(exact, star, map='grad_drop')}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
