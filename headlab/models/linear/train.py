"""Twins: a softmax model and one model per linear kind, trained here on the same data with the same recipe.

Two tasks, the same geometry for every kind (2 layers × 4 heads, width 64, learned positions):

- "recall": periodic random tokens with a period drawn per sequence (toy-induction's data,
  `headlab.inputs.periodic`), attention-only; scored by next-token accuracy on the second
  copy of `[BOS] r r` (the positions an induction / recall mechanism can predict) at several periods.
- "text": next-byte prediction on public-domain text under data/text (trained on the Gospel of John,
  held-out loss on Genesis 1–15), with a byte tokenizer and an MLP per layer.

`train_twin` writes an HF folder (config, safetensors, tokenizer for text), `run.json` (the recipe,
the loss curve, the evaluation) and `README.md` (the model card); `train_twins` does several and skips
those already finished, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headlab.models.linear.config import STACKS, HeadlabLinearConfig
from headlab.models.linear.modeling import HeadlabLinearForCausalLM
from headlab.paths import KJV_GENESIS, KJV_JOHN, TWINS_DIR  # noqa: F401 (TWINS_DIR re-exported)
from headlab.inputs import periodic, windows, with_bos
from headlab.results import read_json, write_atomic, write_json

TEXT_TRAIN = KJV_JOHN
TEXT_HELDOUT = KJV_GENESIS

TASKS = ("recall", "text")
RECALL_VOCAB = 128  # token 0 is BOS (toy-induction's vocabulary)
EVAL_PERIODS = (8, 16, 32)


@dataclass(frozen=True, kw_only=True)
class TwinParams:
    """The recipe of one twin (every kind of a task shares it but for `kind`).

    Attributes:
        task: "recall" or "text".
        kind: a key of STACKS.
        steps, batch, seq_len, lr, warmup, weight_decay, grad_clip: AdamW with linear warm-up and cosine decay.
        hidden, heads, mlp: geometry (mlp 0 = attention-only).
        window: the sliding window of BASED's softmax layer.
        init_std: initialiser std (0.1 lets the recall circuit form within a few hundred steps, as for
            toy-induction).
        period_range: recall periods drawn per sequence.
        seed: seed of init and data.
    """

    task: str
    kind: str
    steps: int = 1500
    batch: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    hidden: int = 64
    heads: int = 4
    mlp: int = 0
    window: int = 8
    init_std: float = 0.1
    period_range: tuple[int, int] = (8, 32)
    seed: int = 0

    @classmethod
    def for_task(cls, task: str, kind: str, **overrides) -> "TwinParams":
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
        if kind not in STACKS:
            raise ValueError(f"unknown twin kind {kind!r}: choose from {', '.join(STACKS)}")
        base = dict(task=task, kind=kind)
        if task == "recall":
            base.update(steps=1000, batch=64, seq_len=64, mlp=0)
        else:
            base.update(steps=1500, batch=16, seq_len=128, mlp=256, init_std=0.02, lr=2e-3)
        base.update(overrides)
        return cls(**base)

    def config(self) -> HeadlabLinearConfig:
        text = self.task == "text"
        return HeadlabLinearConfig(
            vocab_size=257 if text else RECALL_VOCAB, hidden_size=self.hidden, num_hidden_layers=len(STACKS[self.kind]),
            num_attention_heads=self.heads, intermediate_size=self.mlp, layer_kinds=list(STACKS[self.kind]),
            window=self.window, max_position_embeddings=self.seq_len + 1 if not text else self.seq_len,
            initializer_range=self.init_std, bos_token_id=256 if text else 0, eos_token_id=256 if text else 0,
            pad_token_id=256 if text else 0)


def twin_name(task: str, kind: str) -> str:
    return f"{task}-{kind}"


# ----------------------------------------------------------------------------------------------- data

def recall_batch(batch: int, seq_len: int, *, generator: torch.Generator,
                 period_range: tuple[int, int]) -> torch.Tensor:
    """`[B, 1 + seq_len]`: BOS then a periodic random sequence (toy-induction's training data)."""
    return periodic(batch, seq_len, RECALL_VOCAB, generator=generator, period_range=period_range)


def recall_eval_batch(batch: int, period: int, *, seed: int, seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`[BOS] r r …` with period `period` (filling seq_len), and the mask of targets a recall mechanism can predict.

    Returns ids `[B, 1 + seq_len]` and a bool `[B, seq_len]` over next-token targets: True where the target
    lies in a later copy (target position > period + 1, i.e. its predecessor occurred before).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = periodic(batch, seq_len, RECALL_VOCAB, generator=gen, period_range=(period, period))
    target_pos = torch.arange(1, seq_len + 1)
    return ids, (target_pos > period + 1)[None].expand(batch, -1)


def text_bytes(path: Path) -> torch.Tensor:
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


def text_batch(data: torch.Tensor, batch: int, seq_len: int, *, generator: torch.Generator) -> torch.Tensor:
    """`[B, seq_len]`: BOS (256) then `seq_len − 1` bytes from a random offset."""
    starts = torch.randint(0, len(data) - seq_len, (batch,), generator=generator)
    return with_bos(torch.stack([data[s:s + seq_len - 1] for s in starts.tolist()]), 256)


def text_eval_windows(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every non-overlapping window of `seq_len − 1` bytes, each after a BOS: `[N, seq_len]`."""
    return windows(data[: len(data) - 1], seq_len - 1, bos=256)


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: HeadlabLinearForCausalLM, params: TwinParams) -> dict:
    """Recall: accuracy and loss on later-copy targets per period. Text: held-out and training-text loss (nats/byte)."""
    model.eval()
    if params.task == "recall":
        out: dict = {"periods": {}}
        accs = []
        for period in EVAL_PERIODS:
            ids, later = recall_eval_batch(256, period, seed=1234 + period, seq_len=params.seq_len)
            logits = model(input_ids=ids).logits[:, :-1]
            targets = ids[:, 1:]
            right = (logits.argmax(-1) == targets)[later]
            loss = F.cross_entropy(logits[later], targets[later])
            out["periods"][str(period)] = {"accuracy": right.float().mean().item(), "loss": loss.item()}
            accs.append(right.float().mean().item())
        out["recall_accuracy"] = sum(accs) / len(accs)
        return out
    res = {}
    for name, path in (("heldout", TEXT_HELDOUT), ("train_text", TEXT_TRAIN)):
        windows = text_eval_windows(text_bytes(path), params.seq_len)
        total, count = 0.0, 0
        for chunk in windows.split(64):
            logits = model(input_ids=chunk).logits[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += chunk[:, 1:].numel()
        res[f"{name}_loss"] = total / count
    res["heldout_bits_per_byte"] = res["heldout_loss"] / math.log(2)
    return res


# ----------------------------------------------------------------------------------------------- training

def train_twin(params: TwinParams, out: Path | str, *, progress: bool = True, threads: int | None = 2) -> dict:
    """Train one twin and save it to `out` (HF folder + run.json + README.md); returns run.json's content."""
    out = Path(out)
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(params.seed)
        model = HeadlabLinearForCausalLM(params.config())
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)

        def lr_at(step: int) -> float:
            if step < params.warmup:
                return (step + 1) / params.warmup
            t = (step - params.warmup) / max(1, params.steps - params.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        gen = torch.Generator().manual_seed(params.seed + 1)
        data = text_bytes(TEXT_TRAIN) if params.task == "text" else None
        curve: list[tuple[int, float]] = []
        running = None
        t0 = time.perf_counter()
        bar = tqdm(range(params.steps), desc=twin_name(params.task, params.kind), disable=not progress, leave=False)
        for step in bar:
            if params.task == "recall":
                ids = recall_batch(params.batch, params.seq_len, generator=gen, period_range=params.period_range)
            else:
                ids = text_batch(data, params.batch, params.seq_len, generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % 25 == 0 or step == params.steps - 1:
                curve.append((step, round(loss.item(), 5)))
                bar.set_postfix(loss=f"{running:.3f}")
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{twin_name(params.task, params.kind)}: loss became {loss.item()} at step "
                                         f"{step}")
        seconds = time.perf_counter() - t0
        ev = evaluate(model, params)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if params.task == "text":
            from headlab.models.linear.tokenizer import byte_tokenizer

            byte_tokenizer().save_pretrained(out)
        record = {"name": twin_name(params.task, params.kind), "params": asdict(params),
                  "layer_kinds": list(STACKS[params.kind]), "n_params": sum(p.numel() for p in model.parameters()),
                  "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                  "final_train_loss": curve[-1][1], "curve": curve, "eval": ev,
                  "torch": torch.__version__}
        write_atomic(out / "README.md", model_card(record))
        write_json(out / "run.json", record)  # last: the commit marker a rerun looks for
        return record
    finally:
        torch.set_num_threads(prev)


def train_twins(tasks: Iterable[str] = TASKS, kinds: Iterable[str] = tuple(STACKS), *, out: Path | str = TWINS_DIR,
                force: bool = False, progress: bool = True, **overrides) -> dict[str, dict]:
    """Train every (task, kind) twin into `out/<task>-<kind>/`; finished ones (with run.json) are kept unless `force`."""
    out = Path(out)
    done: dict[str, dict] = {}
    jobs = [(t, k) for t in tasks for k in kinds]
    for task, kind in tqdm(jobs, desc="twins", disable=not progress):
        folder = out / twin_name(task, kind)
        record = read_json(folder / "run.json", missing_ok=True) if not force else None
        if record is not None:
            done[twin_name(task, kind)] = record
            continue
        done[twin_name(task, kind)] = train_twin(TwinParams.for_task(task, kind, **overrides), folder,
                                                 progress=progress)
    if out.exists():
        rows = summary_table(out)
        write_json(out / "summary.json", rows)
        write_atomic(out / "README.md", summary_markdown(rows))
    return done


def summary_markdown(rows: list[dict]) -> str:
    """The index of a twins folder: one table per task (written by `train_twins`)."""
    lines = ["# Softmax / linear-attention twins", "",
             "Trained here by `headlab train twins` (or `python data/linear-twins/train_twins.py`); the recipe is",
             "`headlab.models.linear.train.TwinParams`, the same for every kind of a task. Each folder is an HF model",
             "folder with `run.json` (recipe, loss curve, evaluation) and a model card. Load one with",
             "`headlab.load(\"twin-<task>-<kind>\")`.", ""]
    recall = [r for r in rows if "recall_accuracy" in r]
    text = [r for r in rows if "heldout_loss" in r]
    if recall:
        periods = sorted({k for r in recall for k in r if k.startswith("acc_p")}, key=lambda k: int(k[5:]))
        lines += ["## Recall (periodic random tokens; next-token accuracy on later copies)", "",
                  "| twin | layers | params | mean accuracy | " + " | ".join(f"period {p[5:]}" for p in periods)
                  + " | train s |", "|---|---|---|---|" + "---|" * len(periods) + "---|"]
        lines += [f"| {r['twin']} | {r['layers']} | {r['params']:,} | {r['recall_accuracy']:.4f} | "
                  + " | ".join(f"{r.get(p, float('nan')):.4f}" for p in periods) + f" | {r['train_s']} |"
                  for r in recall]
        lines.append("")
    if text:
        lines += ["## Text (KJV bytes: trained on John, held out: Genesis 1–15)", "",
                  "| twin | layers | params | held-out loss (nats/byte) | bits/byte | final train loss | train s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['twin']} | {r['layers']} | {r['params']:,} | {r['heldout_loss']:.4f} | "
                  f"{r['heldout_bits_per_byte']:.4f} | {r['final_train_loss']} | {r['train_s']} |" for r in text]
        lines.append("")
    lines += ["Training times are wall-clock on a shared 2-core machine (other jobs ran beside them): compare",
              "them only loosely.", ""]
    return "\n".join(lines)


def summary_table(out: Path | str = TWINS_DIR) -> list[dict]:
    """One row per trained twin under `out`: recall accuracy per period, held-out loss, parameters, time."""
    rows = []
    for run in sorted(Path(out).glob("*/run.json")):
        r = json.loads(run.read_text())
        row = {"twin": r["name"], "layers": "+".join(r["layer_kinds"]), "params": r["n_params"],
               "train_s": r["train_seconds"], "final_train_loss": r["final_train_loss"]}
        ev = r["eval"]
        if "recall_accuracy" in ev:
            row["recall_accuracy"] = round(ev["recall_accuracy"], 4)
            row.update({f"acc_p{p}": round(v["accuracy"], 4) for p, v in ev["periods"].items()})
        else:
            row["heldout_loss"] = round(ev["heldout_loss"], 4)
            row["heldout_bits_per_byte"] = round(ev["heldout_bits_per_byte"], 4)
        rows.append(row)
    return rows


def model_card(record: dict) -> str:
    p = record["params"]
    ev = record["eval"]
    lines = [f"# {record['name']}: a headlab twin ({' + '.join(record['layer_kinds'])})", "",
             "Trained here by `headlab train twins` (headlab/models/linear/train.py); every twin of a task shares",
             "this recipe and differs only in its layers' mixers.", "",
             f"- task: **{p['task']}**; layers: {', '.join(record['layer_kinds'])}; {p['heads']} heads, width "
             f"{p['hidden']}, MLP {p['mlp'] or 'none (attention-only)'}; {record['n_params']:,} parameters",
             f"- recipe: {p['steps']} steps × batch {p['batch']} × {p['seq_len']} tokens, AdamW lr {p['lr']} "
             f"(warm-up {p['warmup']}, cosine to 10%), clip {p['grad_clip']}, init std {p['init_std']}, seed {p['seed']}",
             f"- trained in {record['train_seconds']} s on {record['threads']} CPU threads (torch {record['torch']}); "
             f"final training loss {record['final_train_loss']}", ""]
    if p["task"] == "recall":
        lines += ["Data: `[BOS]` + a periodic sequence of random tokens (vocabulary 1..127), period drawn per sequence "
                  f"from {p['period_range'][0]}..{p['period_range'][1]} (toy-induction's data).", "",
                  "| period | recall accuracy | loss |", "|---|---|---|"]
        lines += [f"| {k} | {v['accuracy']:.4f} | {v['loss']:.4f} |" for k, v in ev["periods"].items()]
        lines += ["", f"Mean recall accuracy: **{ev['recall_accuracy']:.4f}** (next-token accuracy on targets in a "
                  "later copy, 256 held-out sequences per period)."]
    else:
        lines += ["Data: bytes of the King James Version (public domain, data/text): trained on the Gospel of John, "
                  "evaluated on every 127-byte window of Genesis 1–15 (held out).", "",
                  f"Held-out loss: **{ev['heldout_loss']:.4f} nats/byte** ({ev['heldout_bits_per_byte']:.3f} bits/byte); "
                  f"on the training text: {ev['train_text_loss']:.4f}."]
    lines += ["", "Load: `headlab.load(\"<this folder>\")`; the implicit pattern of every linear head comes from",
              "`HeadModel.run(...).pattern(head)` (pattern @ V = the layer's output).", ""]
    return "\n".join(lines)
