"""Baseline of smollm2-135m on the circuit-discovery tasks (headlab.tasks.circuits): accuracy and logit differences.

Usage: python scripts/circuit_tasks_baseline.py [--n 200] [--seed 0] [--batch 16] [--threads 2] [--tasks ...]
       [--out benchmarks/results]

For each task: n clean / corrupted pairs (seed 0), one plain HF forward per prompt batch (`model.hf` on
`model.encode(prompts)`, right-padded; the logits read at each prompt's last real token), then
- acc: logit[answer] > logit[wrong] on the clean prompts;
- argmax acc: the answer is the argmax over the whole vocabulary;
- LD clean / LD corrupt: mean logit[answer] - logit[wrong] on the clean and on the corrupted prompts (the same ids);
- corrupt acc: the share of corrupted prompts where the clean answer still wins;
- a task-specific check where the pair's single wrong token hides a choice (see `extra`).
Writes circuit_tasks_smollm2.md and circuit_tasks_smollm2.json under --out. SmolLM2's weights are a 4-bit (Q4_1)
dequantisation of the instruct model; the prompts are fed without a chat template.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import transformers

import headlab as hl
from headlab.results import write_atomic, write_json
from headlab.tasks.circuits import CIRCUIT_TASKS, CircuitBatch, make_task
from headlab.tasks.scoring import wilson

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def last_logits(model: hl.HeadModel, prompts: list[str], batch_size: int) -> torch.Tensor:
    """`[N, V]` float32 logits at each prompt's last real token."""
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = model.encode(prompts[i:i + batch_size])
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        last = torch.tensor(batch.lengths, device=logits.device) - 1
        out.append(logits[torch.arange(len(last), device=logits.device), last].float().cpu())
    return torch.cat(out)


def extra(task: CircuitBatch, tokenizer, clean: torch.Tensor) -> dict:
    """Checks that compare the answer with more than the pair's one wrong token (what the papers measure)."""
    items = task.meta["items"]
    if task.task == "greater_than":
        # Hanna et al.'s probability difference at this token: P(tens digit > d) - P(tens digit < d).
        digit_ids = [tokenizer.encode(str(k), add_special_tokens=False)[0] for k in range(10)]
        probs = clean.softmax(-1)[:, digit_ids]
        d = torch.tensor([it["year"] // 10 % 10 for it in items])
        k = torch.arange(10)
        above = (probs * (k[None] > d[:, None])).sum(-1)
        below = (probs * (k[None] < d[:, None])).sum(-1)
        return {"prob_diff (P(>d) - P(<d))": round((above - below).mean().item(), 4),
                "acc P(>d) > P(<d)": round((above > below).float().mean().item(), 4),
                "argmax digit > d": round((clean[:, digit_ids].argmax(-1) > d).float().mean().item(), 4)}
    if task.task == "colored_objects":
        ids = torch.tensor([[tokenizer.encode(" " + c.title(), add_special_tokens=False)[0] for c in it["colors"]]
                            for it in items])
        listed = clean.gather(1, ids)
        q = torch.tensor([it["query"] for it in items])
        picked = listed.argmax(-1)
        top = clean.argmax(-1)
        shot = torch.tensor([tokenizer.encode(" " + it["shot"]["colors"][it["shot"]["query"]].title(),
                                              add_special_tokens=False)[0] for it in items])
        return {"acc vs both other listed colours": round((picked == q).float().mean().item(), 4),
                "top-1 is a listed colour": round((top[:, None] == ids).any(-1).float().mean().item(), 4),
                "top-1 is the shot's answer": round((top == shot).float().mean().item(), 4),
                "share of the top listed colour at c1 / c2 / c3": [round((picked == k).float().mean().item(), 3)
                                                                   for k in range(3)],
                "share of queries at c1 / c2 / c3": [round((q == k).float().mean().item(), 3) for k in range(3)]}
    if task.task == "docstring":
        ids = torch.tensor([[tokenizer.encode(" " + a, add_special_tokens=False)[0] for a in it["def_args"]]
                            for it in items])
        args = clean.gather(1, ids)
        answer = torch.tensor([it["def_args"].index(it["answer"]) for it in items])
        return {"acc vs every other def argument": round((args.argmax(-1) == answer).float().mean().item(), 4)}
    if task.task == "ioi":
        abba = torch.tensor([it["form"] == "ABBA" for it in items])
        ld = clean.gather(1, task.answer[:, None])[:, 0] - clean.gather(1, task.wrong[:, None])[:, 0]
        return {"acc ABBA": round((ld[abba] > 0).float().mean().item(), 4),
                "acc BABA": round((ld[~abba] > 0).float().mean().item(), 4)}
    return {}


def measure(model: hl.HeadModel, name: str, n: int, seed: int, batch_size: int) -> dict:
    t0 = time.perf_counter()
    task = make_task(name, model.tokenizer, n, seed=seed)
    t1 = time.perf_counter()
    clean = last_logits(model, task.clean, batch_size)
    corrupt = last_logits(model, task.corrupt, batch_size)
    t2 = time.perf_counter()
    lengths = torch.tensor(model.encode(task.clean).lengths) - 1
    assert torch.equal(lengths, task.positions["end"]), "model.encode disagrees with the task's token positions"

    def diff(logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, task.answer[:, None])[:, 0] - logits.gather(1, task.wrong[:, None])[:, 0]

    ld_clean, ld_corrupt = diff(clean), diff(corrupt)
    top = clean.argmax(-1)
    tokenizer = model.tokenizer
    wins = int((ld_clean > 0).sum())
    return {
        "task": name, "n": n, "seed": seed,
        "acc": round(wins / n, 4), "acc_ci95": [round(x, 3) for x in wilson(wins, n)],
        "argmax_acc": round((top == task.answer).float().mean().item(), 4),
        "ld_clean": round(ld_clean.mean().item(), 3), "ld_clean_std": round(ld_clean.std().item(), 3),
        "ld_corrupt": round(ld_corrupt.mean().item(), 3), "ld_corrupt_std": round(ld_corrupt.std().item(), 3),
        "corrupt_acc": round((ld_corrupt > 0).float().mean().item(), 4),
        "mean_tokens": round(task.positions["end"].float().add(1).mean().item(), 1),
        "build_s": round(t1 - t0, 3), "forward_s": round(t2 - t1, 2),
        "extra": extra(task, tokenizer, clean),
        "top_predictions": _top_counts(tokenizer, top),
        "example": {"clean": task.clean[0], "corrupt": task.corrupt[0],
                    "answer": tokenizer.decode([int(task.answer[0])]), "wrong": tokenizer.decode([int(task.wrong[0])])},
        "redrawn": task.meta["redrawn"], "dropped_words": task.meta.get("dropped_words", []),
    }


def _top_counts(tokenizer, top: torch.Tensor, k: int = 5) -> list[list]:
    ids, counts = top.unique(return_counts=True)
    order = counts.argsort(descending=True)[:k]
    return [[tokenizer.decode([int(ids[i])]), int(counts[i])] for i in order]


def markdown(rows: list[dict], meta: dict) -> str:
    setup = (f"{meta['weights_note']}. Prompts fed without a chat template (no BOS: the tokenizer adds none); "
             f"n = {meta['n']} pairs per task, seed {meta['seed']}, CPU with {meta['threads']} threads, batches of "
             f"{meta['batch']}, torch {meta['torch']}, transformers {meta['transformers']}. Written by "
             "`scripts/circuit_tasks_baseline.py`; the task data and what each task's wrong token is are in "
             "`data/circuits/<task>.json`.")
    legend = ("acc: logit[answer] > logit[wrong] (clean), with its 95% Wilson interval; argmax acc: the answer is "
              "the top token of the whole vocabulary; LD: mean logit[answer] - logit[wrong] (± std) on the clean and "
              "on the corrupted prompts (the clean pair's ids); corrupt acc: the share of corrupted prompts where the "
              "clean answer still wins; tokens: mean clean prompt length; time: wall clock of the clean and corrupted "
              "forwards (the 2-core machine is shared: times vary several-fold with its load, only the other "
              "columns are reproducible).")
    header = ("| task | n | acc (95% CI) | argmax acc | LD clean | LD corrupt | corrupt acc | tokens "
              "| time (s) |")
    lines = ["# Circuit tasks: smollm2-135m baseline", "", setup, "", legend, "", header,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["acc_ci95"]
        lines.append(f"| {r['task']} | {r['n']} | {r['acc']:.3f} ({lo:.2f}–{hi:.2f}) | {r['argmax_acc']:.3f} | "
                     f"{r['ld_clean']:.2f} ± {r['ld_clean_std']:.2f} | "
                     f"{r['ld_corrupt']:.2f} ± {r['ld_corrupt_std']:.2f} | {r['corrupt_acc']:.3f} | "
                     f"{r['mean_tokens']} | {r['forward_s']:.1f} |")
    lines += ["", "## Task-specific checks", ""]
    for r in rows:
        if r["extra"]:
            lines.append(f"- {r['task']}: " + "; ".join(f"{k} = {v}" for k, v in r["extra"].items()))
    lines += ["", "## Most frequent top-1 tokens (clean)", ""]
    for r in rows:
        lines.append(f"- {r['task']}: " + ", ".join(f"`{t!r}` ×{c}" for t, c in r["top_predictions"]))
    lines += ["", "## One pair per task", ""]
    for r in rows:
        ex = r["example"]
        lines += [f"### {r['task']}", "", "```", ex["clean"], "```", "", "corrupted:", "", "```", ex["corrupt"], "```",
                  "", f"answer `{ex['answer']!r}`, wrong `{ex['wrong']!r}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=list(CIRCUIT_TASKS), choices=CIRCUIT_TASKS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = hl.load("smollm2-135m", device="cpu")
    meta = {"model": "smollm2-135m", "weights_note": model.note, "n": args.n, "seed": args.seed,
            "threads": args.threads, "batch": args.batch, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": "cpu"}
    rows = []
    for name in args.tasks:
        row = measure(model, name, args.n, args.seed, args.batch)
        print(f"{name:18s} acc {row['acc']:.3f}  argmax {row['argmax_acc']:.3f}  LD clean {row['ld_clean']:6.2f}  "
              f"LD corrupt {row['ld_corrupt']:6.2f}  ({row['forward_s']:.1f}s)  {row['extra']}", flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "circuit_tasks_smollm2.json", {"meta": meta, "tasks": rows})
    write_atomic(args.out / "circuit_tasks_smollm2.md", markdown(rows, meta) + "\n")
    print(f"wrote {args.out / 'circuit_tasks_smollm2.md'}")


if __name__ == "__main__":
    main()
