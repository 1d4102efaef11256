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

The MQAR recipe (task "mqar": multi-query associative recall at length 256, without learned positions: RoPE on softmax
layers, nothing on linear ones; optionally a short convolution on q, k, v) and its evaluation at 256–2048
(`evaluate_mqar`) are here; mqar_twins.py trains them over kinds × widths into data/mqar-twins/ with a summary.

`train_moh_pair` trains a Mixture-of-Head model (kind "moh" of MOH_STACKS: softmax layers whose heads are routed per
token) and its multi-head-attention twin the same way, into data/moh-twins/, with a summary of both (held-out loss,
the MoH model's routing statistics from `routing_stats`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headlab.models.linear.config import MOH_STACKS, SOFTMAX_KINDS, STACKS, HeadlabLinearConfig, twin_stack
from headlab.models.linear.modeling import HeadlabLinearForCausalLM
from headlab.paths import (  # noqa: F401 (TWINS_DIR re-exported)
    KJV_GENESIS,
    KJV_JOHN,
    MOH_TWINS_DIR,
    MQAR_TWINS_DIR,
    TWINS_DIR,
)
from headlab.inputs import mqar, periodic, windows, with_bos
from headlab.results import read_json, write_atomic, write_json

TEXT_TRAIN = KJV_JOHN
TEXT_HELDOUT = KJV_GENESIS

TASKS = ("recall", "text")  # the tasks of `train_twins` (data/linear-twins)
MQAR = "mqar"  # the task of `train_mqar_twins` (data/mqar-twins): TwinParams.for_task("mqar", kind)
RECALL_VOCAB = 128  # token 0 is BOS (toy-induction's vocabulary)
EVAL_PERIODS = (8, 16, 32)
MQAR_EVAL_LENGTHS = (256, 512, 1024, 2048)
MQAR_EVAL_SEQUENCES = 64  # per length: 64 × mqar_pairs queries
MQAR_EVAL_SEED = 4321


def mqar_position(kind: str) -> str:
    """The position option of a kind's MQAR twin: "rotary" where the stack has a softmax layer (softmax; BASED's
    sliding-window layer), "none" for the purely linear stacks (their layers carry order themselves). Either way only
    softmax layers are rotated, so "rotary" on a linear stack would be the same model."""
    return "rotary" if any(k in SOFTMAX_KINDS for k in twin_stack(kind)) else "none"


@dataclass(frozen=True, kw_only=True)
class TwinParams:
    """The recipe of one twin (every kind of a task shares it but for `kind`).

    Attributes:
        task: "recall", "text" or "mqar".
        kind: a key of STACKS, or of MOH_STACKS (then moh_active ≥ 1).
        steps, batch, seq_len, lr, warmup, weight_decay, grad_clip: AdamW with linear warm-up and cosine decay.
        hidden, heads, mlp: geometry (mlp 0 = attention-only).
        window: the sliding window of BASED's softmax layer.
        init_std: initialiser std (0.1 lets the recall circuit form within a few hundred steps, as for
            toy-induction).
        period_range: recall periods drawn per sequence.
        seed: seed of init and data.
        position: HeadlabLinearConfig.position ("learned" for recall / text; `mqar_position(kind)` for mqar).
        mqar_vocab, mqar_pairs: MQAR's vocabulary (token 0 the filler, keys 1..V/2 − 1, values V/2..V − 1) and number
            of key-value pairs per sequence (`headlab.inputs.mqar`).
        mqar_queries: queries per training sequence, keys asked again (repeat=True: denser supervision than one
            query per key); 0: half the slots of the query region, so training also sees filler between queries.
            Evaluation asks each key once (`evaluate_mqar`).
        moh_shared, moh_active, moh_balance_coef: Mixture-of-Head layers (MOH_STACKS kinds only): h_s shared heads,
            the top-K of the other heads per token, and the load-balance loss weight (HeadlabLinearConfig's
            moh_shared_heads / moh_active_heads / moh_balance_coef).
        short_conv: HeadlabLinearConfig.short_conv, a short causal convolution of kernel K on every layer's q, k, v
            (0: none, the recipe every twin before it had).
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
    moh_shared: int = 0
    moh_active: int = 0
    moh_balance_coef: float = 0.01
    position: str = "learned"
    mqar_vocab: int = 64
    mqar_pairs: int = 16
    mqar_queries: int = 0
    short_conv: int = 0

    def __post_init__(self) -> None:
        twin_stack(self.kind)
        if self.task == MQAR:  # the generator's own errors, before any training
            mqar(1, self.seq_len, self.mqar_pairs, self.mqar_vocab, num_queries=self.train_queries, repeat=True)
        if (self.kind in MOH_STACKS) != (self.moh_active > 0):
            raise ValueError(f"twin kind {self.kind!r} with moh_active={self.moh_active}: Mixture-of-Head kinds "
                             f"({', '.join(MOH_STACKS)}) need moh_active >= 1 and the others route nothing")

    @classmethod
    def for_task(cls, task: str, kind: str, **overrides) -> "TwinParams":
        if task not in (*TASKS, MQAR):
            raise ValueError(f"unknown task {task!r}: choose from {', '.join((*TASKS, MQAR))}")
        twin_stack(kind)  # ValueError naming the kinds
        base = dict(task=task, kind=kind)
        if task == "recall":
            base.update(steps=1000, batch=64, seq_len=64, mlp=0)
        elif task == MQAR:
            base.update(steps=1500, batch=16, seq_len=256, mlp=0, position=mqar_position(kind))
        else:
            base.update(steps=1500, batch=16, seq_len=128, mlp=256, init_std=0.02, lr=2e-3)
        base.update(overrides)
        return cls(**base)

    @property
    def train_queries(self) -> int:
        """MQAR queries per training sequence (mqar_queries, or half the slots of the query region when 0)."""
        return self.mqar_queries or max(1, (self.seq_len - 2 * self.mqar_pairs) // 4)

    def config(self) -> HeadlabLinearConfig:
        text = self.task == "text"
        layers = twin_stack(self.kind)
        moh = dict(moh_shared_heads=self.moh_shared, moh_active_heads=self.moh_active,
                   moh_balance_coef=self.moh_balance_coef) if self.moh_active else {}
        vocab = 257 if text else self.mqar_vocab if self.task == MQAR else RECALL_VOCAB
        # learned positions cover the training length (recall adds a BOS); other positions set no limit
        positions = (self.seq_len if text or self.task == MQAR else self.seq_len + 1) \
            if self.position == "learned" else None
        return HeadlabLinearConfig(
            vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=len(layers),
            num_attention_heads=self.heads, intermediate_size=self.mlp, layer_kinds=list(layers), **moh,
            window=self.window, max_position_embeddings=positions, position=self.position,
            initializer_range=self.init_std, bos_token_id=256 if text else 0, eos_token_id=256 if text else 0,
            pad_token_id=256 if text else 0, short_conv=self.short_conv)


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
    """Recall: accuracy and loss on later-copy targets per period. Text: held-out and training-text loss (nats/byte).
    MQAR: `evaluate_mqar` at MQAR_EVAL_LENGTHS."""
    model.eval()
    if params.task == MQAR:
        return evaluate_mqar(model, params)
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
    if model.config.moh:
        res["routing"] = routing_stats(model, text_eval_windows(text_bytes(TEXT_HELDOUT), params.seq_len))
    return res


def mqar_eval_batch(params: TwinParams, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out MQAR sequences at one length: MQAR_EVAL_SEQUENCES rows of the training's `mqar_pairs` pairs, each
    key queried once, the queries spread uniformly over the rest of the sequence (filler between them), seed
    MQAR_EVAL_SEED + length. Returns ids and answers `[N, length]` (`headlab.inputs.mqar`)."""
    return mqar(MQAR_EVAL_SEQUENCES, length, params.mqar_pairs, params.mqar_vocab, seed=MQAR_EVAL_SEED + length)


@torch.no_grad()
def evaluate_mqar(model: HeadlabLinearForCausalLM, params: TwinParams,
                  lengths: Iterable[int] | None = None, *, batch: int = 16) -> dict:
    """MQAR accuracy by evaluation length (default MQAR_EVAL_LENGTHS): the same number of pairs as in training
    (`mqar_pairs`), spread over a longer sequence with filler (`mqar_eval_batch`), so only the distance from the pairs
    to their queries grows.

    Returns {"lengths": {"<L>": {"accuracy", "loss", "queries"}}, "mqar_accuracy": the accuracy at the training
    length (or the first length), "train_distribution": {"accuracy", "loss", "queries"} on held-out sequences drawn
    as in training (length seq_len, `train_queries` queries, keys asked again)}: accuracy = share of queried values
    that are the argmax prediction at their key, loss = mean cross-entropy there (nats).
    """
    model.eval()

    def score(ids: torch.Tensor, answers: torch.Tensor) -> dict:
        right, loss, count = 0, 0.0, 0
        for chunk, ans in zip(ids.split(batch), answers.split(batch)):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            target, where = chunk[:, 1:], ans[:, 1:]
            right += int((logits.argmax(-1) == target)[where].sum())
            loss += float(F.cross_entropy(logits[where], target[where], reduction="sum"))
            count += int(where.sum())
        return {"accuracy": right / count, "loss": loss / count, "queries": count}

    out: dict = {"lengths": {str(n): score(*mqar_eval_batch(params, n))
                             for n in (MQAR_EVAL_LENGTHS if lengths is None else lengths)}}
    key = str(params.seq_len) if str(params.seq_len) in out["lengths"] else next(iter(out["lengths"]))
    out["mqar_accuracy"] = out["lengths"][key]["accuracy"]
    out["train_distribution"] = score(*mqar(MQAR_EVAL_SEQUENCES, params.seq_len, params.mqar_pairs, params.mqar_vocab,
                                            num_queries=params.train_queries, repeat=True, seed=MQAR_EVAL_SEED))
    return out


def state_sizes(config: HeadlabLinearConfig) -> list[dict]:
    """What each layer keeps per head to continue a sequence: a linear layer its state, F × D floats (F: the feature
    dim: D for linear, GLA, DeltaNet; 2 × hedgehog_feature_dim; 1 + d + d² for BASED with d = based_feature_dim), a
    softmax layer its KV cache, 2·D floats per token (a sliding-window layer at most `window` tokens of it)."""
    D = config.head_dim
    rows = []
    for i, kind in enumerate(config.layer_kinds):
        row: dict = {"layer": i, "kind": kind}
        if kind in SOFTMAX_KINDS:
            row["kv_cache_per_token"] = 2 * D
            if kind == "swa":
                row["kv_cache_max"] = 2 * D * config.window
        else:
            d = config.based_feature_dim
            F_ = {"hedgehog": 2 * config.hedgehog_feature_dim, "based": 1 + d + d * d}.get(kind, D)
            row.update(feature_dim=F_, state=F_ * D)
        rows.append(row)
    return rows


@torch.no_grad()
def routing_stats(model: HeadlabLinearForCausalLM, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  batch: int = 64) -> dict:
    """How a MoH model routes its heads over `ids` `[N, T]` (padding, where `attention_mask` is 0, left out).

    Per MoH layer: `activation_frequency` `[H]` (share of tokens with the head's gate > 0: 1 for shared heads),
    `mean_gate` `[H]`, over the routed heads `mean_probability` P_i and `routed_frequency` f_i, the load balance
    `balance` = h_r · Σ P_i f_i over all the tokens (`balance_uniform` = K: its value at perfect balance),
    `cv_routed_frequency` (population std / mean of f_i: 0 when every routed head is chosen equally often),
    `routing_entropy` (mean over tokens of the entropy of softmax(W_r x), nats; `routing_entropy_max` = ln h_r) and
    `shared_share` (mean α1, the weight of the shared heads; None without them). The top level averages the layers'
    balance, CV and entropy.
    """
    model.eval()
    layers = [block.attn for block in model.model.layers if block.attn.moh]
    if not layers:
        raise ValueError("routing_stats: the model has no Mixture-of-Head layer (config.moh_active_heads is 0)")
    acc: dict[int, dict] = {}

    def hook(module, args, kwargs, output) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        key_mask = kwargs.get("key_mask")
        r = module.route(x, key_mask)
        w = torch.ones(x.shape[:2], dtype=torch.float32) if key_mask is None else key_mask.to(torch.float32)
        w = w.to(x.device)[..., None]
        entropy = -(r.probs * r.probs.clamp_min(1e-30).log()).sum(-1, keepdim=True)
        sums = {"tokens": w.sum(), "active": ((r.gates > 0).float() * w).sum((0, 1)),
                "gate": (r.gates.float() * w).sum((0, 1)), "prob": (r.probs * w).sum((0, 1)),
                "selected": (r.selected.float() * w).sum((0, 1)), "entropy": (entropy * w).sum()}
        if r.shares is not None:
            sums["share"] = (r.shares[..., :1] * w).sum()
        a = acc.setdefault(module.layer_idx, {})
        for key, value in sums.items():
            a[key] = a[key] + value if key in a else value

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        masks = attention_mask.split(batch) if attention_mask is not None else [None] * len(ids.split(batch))
        for chunk, mask in zip(ids.split(batch), masks):
            model(input_ids=chunk, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    out_layers = []
    for module in layers:
        a = acc[module.layer_idx]
        n = a["tokens"].clamp_min(1.0)
        p, f = a["prob"] / n, a["selected"] / n
        out_layers.append({
            "layer": module.layer_idx,
            "shared_heads": list(range(module.moh_shared)),
            "activation_frequency": [round(v, 6) for v in (a["active"] / n).tolist()],
            "mean_gate": [round(v, 6) for v in (a["gate"] / n).tolist()],
            "mean_probability": [round(v, 6) for v in p.tolist()],
            "routed_frequency": [round(v, 6) for v in f.tolist()],
            "balance": module.moh_routed * float((p * f).sum()),
            "balance_uniform": float(module.moh_active),
            "cv_routed_frequency": float(f.std(unbiased=False) / f.mean()),
            "routing_entropy": float(a["entropy"] / n),
            "routing_entropy_max": math.log(module.moh_routed),
            "shared_share": float(a["share"] / n) if "share" in a else None,
        })
    mean = lambda key: sum(layer[key] for layer in out_layers) / len(out_layers)  # noqa: E731
    return {"tokens": int(acc[layers[0].layer_idx]["tokens"]), "balance": mean("balance"),
            "cv_routed_frequency": mean("cv_routed_frequency"), "routing_entropy": mean("routing_entropy"),
            "layers": out_layers}


# ----------------------------------------------------------------------------------------------- training

def train_twin(params: TwinParams, out: Path | str, *, progress: bool = True, threads: int | None = 2,
               name: str | None = None, trained_by: str = "`headlab train twins`") -> dict:
    """Train one twin and save it to `out` (HF folder + run.json + README.md); returns run.json's content.

    `name` (default `<task>-<kind>`) and `trained_by` go into run.json and the model card. A MoH twin's loss curve
    is its cross-entropy (comparable with its MHA twin's); its load-balance term has a curve of its own.
    """
    out = Path(out)
    name = name or twin_name(params.task, params.kind)
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
        balance_curve: list[tuple[int, float]] = []
        running = None
        t0 = time.perf_counter()
        bar = tqdm(range(params.steps), desc=name, disable=not progress, leave=False)
        for step in bar:
            labels = None
            if params.task == "recall":
                ids = recall_batch(params.batch, params.seq_len, generator=gen, period_range=params.period_range)
            elif params.task == MQAR:  # the loss reads the answers only
                ids, answers = mqar(params.batch, params.seq_len, params.mqar_pairs, params.mqar_vocab,
                                    num_queries=params.train_queries, repeat=True, generator=gen)
                labels = ids.masked_fill(~answers, -100)
            else:
                ids = text_batch(data, params.batch, params.seq_len, generator=gen)
            output = model(input_ids=ids, labels=ids if labels is None else labels)
            loss = output.loss  # cross-entropy (+ moh_balance_coef · L_b for a MoH model)
            if output.moh_balance is not None:
                if step % 25 == 0 or step == params.steps - 1:
                    balance_curve.append((step, round(output.moh_balance.item(), 5)))
                ce = loss.item() - params.moh_balance_coef * output.moh_balance.item()
            else:
                ce = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            sched.step()
            running = ce if running is None else 0.95 * running + 0.05 * ce
            if step % 25 == 0 or step == params.steps - 1:
                curve.append((step, round(ce, 5)))
                bar.set_postfix(loss=f"{running:.3f}")
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step}")
        seconds = time.perf_counter() - t0
        ev = evaluate(model, params)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if params.task == "text":
            from headlab.models.linear.tokenizer import byte_tokenizer

            byte_tokenizer().save_pretrained(out)
        record = {"name": name, "params": asdict(params),
                  "layer_kinds": list(twin_stack(params.kind)), "n_params": sum(p.numel() for p in model.parameters()),
                  **({"state": state_sizes(model.config)} if params.task == MQAR else {}),
                  "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                  "final_train_loss": curve[-1][1], "curve": curve, "eval": ev,
                  "torch": torch.__version__, "trained_by": trained_by}
        if params.moh_active:
            record["moh"] = {"shared_heads": params.moh_shared, "active_heads": params.moh_active,
                             "routed_heads": params.heads - params.moh_shared, "balance_coef": params.moh_balance_coef}
            record["balance_curve"] = balance_curve
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
    moh = record.get("moh")
    lines = [f"# {record['name']}: a headlab twin ({' + '.join(record['layer_kinds'])}{', MoH' if moh else ''})", "",
             f"Trained here by {record.get('trained_by', '`headlab train twins`')} (headlab/models/linear/train.py); "
             "every twin of a task shares",
             "this recipe and differs only in its layers' mixers.", "",
             f"- task: **{p['task']}**; layers: {', '.join(record['layer_kinds'])}; {p['heads']} heads, width "
             f"{p['hidden']}, MLP {p['mlp'] or 'none (attention-only)'}; {record['n_params']:,} parameters",
             f"- recipe: {p['steps']} steps × batch {p['batch']} × {p['seq_len']} tokens, AdamW lr {p['lr']} "
             f"(warm-up {p['warmup']}, cosine to 10%), clip {p['grad_clip']}, init std {p['init_std']}, seed {p['seed']}",
             f"- trained in {record['train_seconds']} s on {record['threads']} CPU threads (torch {record['torch']}); "
             f"final training loss {record['final_train_loss']}", ""]
    if moh:
        lines[-1:-1] = [
            f"- Mixture-of-Head attention (Jin et al. 2024): per layer {moh['shared_heads']} shared heads (always on) "
            f"and the top-{moh['active_heads']} of {moh['routed_heads']} routed heads per token "
            f"({moh['shared_heads'] + moh['active_heads']} of {p['heads']} heads active); load-balance loss weight "
            f"{moh['balance_coef']} (the training loss above is the cross-entropy alone)"]
    if p.get("short_conv"):
        lines[-1:-1] = [f"- short convolution: a causal depthwise Conv1d of kernel {p['short_conv']} (no bias, then SiLU) "
                        "on every layer's q, k and v projections (HeadlabLinearConfig.short_conv)"]
    if p["task"] == "recall":
        lines += ["Data: `[BOS]` + a periodic sequence of random tokens (vocabulary 1..127), period drawn per sequence "
                  f"from {p['period_range'][0]}..{p['period_range'][1]} (toy-induction's data).", "",
                  "| period | recall accuracy | loss |", "|---|---|---|"]
        lines += [f"| {k} | {v['accuracy']:.4f} | {v['loss']:.4f} |" for k, v in ev["periods"].items()]
        lines += ["", f"Mean recall accuracy: **{ev['recall_accuracy']:.4f}** (next-token accuracy on targets in a "
                  "later copy, 256 held-out sequences per period)."]
    elif p["task"] == MQAR:
        state = "; ".join(f"layer {r['layer']} ({r['kind']}): " + (f"state {r['feature_dim']}×{p['hidden'] // p['heads']}"
                                                                   f" = {r['state']} floats per head" if "state" in r
                                                                   else f"KV cache {r['kv_cache_per_token']} floats "
                                                                   "per head per token")
                          for r in record["state"])
        lines += [f"Data: multi-query associative recall (`headlab.inputs.mqar`), vocabulary {p['mqar_vocab']} (keys "
                  f"1..{p['mqar_vocab'] // 2 - 1}, values {p['mqar_vocab'] // 2}..{p['mqar_vocab'] - 1}, filler 0), "
                  f"{p['mqar_pairs']} key-value pairs then {ev['train_distribution']['queries'] // MQAR_EVAL_SEQUENCES} "
                  f"queries among filler in the rest of {p['seq_len']} tokens (keys asked again; loss on the answers "
                  f"only). Positions: {p['position']}. Accuracy on held-out sequences of that kind: "
                  f"{ev['train_distribution']['accuracy']:.4f}.", "",
                  f"What it keeps per head to go on: {state}.", "",
                  "Accuracy on the queried values, the same pairs with each key queried once, spread over longer "
                  f"sequences ({MQAR_EVAL_SEQUENCES} held-out sequences per length):", "",
                  "| length | accuracy | loss |", "|---|---|---|"]
        lines += [f"| {k} | {v['accuracy']:.4f} | {v['loss']:.4f} |" for k, v in ev["lengths"].items()]
    else:
        lines += ["Data: bytes of the King James Version (public domain, data/text): trained on the Gospel of John, "
                  "evaluated on every 127-byte window of Genesis 1–15 (held out).", "",
                  f"Held-out loss: **{ev['heldout_loss']:.4f} nats/byte** ({ev['heldout_bits_per_byte']:.3f} bits/byte); "
                  f"on the training text: {ev['train_text_loss']:.4f}."]
    if "routing" in ev:
        lines += ["", "Routing on the held-out text (share of tokens turning each head on; shared heads first):", "",
                  "| layer | activation frequency per head | L_b (K at balance) | CV of routed frequencies | "
                  "routing entropy (nats, max) |", "|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {' '.join(f'{v:.3f}' for v in r['activation_frequency'])} | {r['balance']:.3f} "
                  f"({r['balance_uniform']:g}) | {r['cv_routed_frequency']:.3f} | {r['routing_entropy']:.3f} "
                  f"({r['routing_entropy_max']:.3f}) |" for r in ev["routing"]["layers"]]
    lines += ["", "Load: `headlab.load(\"<this folder>\")`; the implicit pattern of every linear head comes from",
              "`HeadModel.run(...).pattern(head)` (pattern @ V = the layer's output).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- MoH pair

#: The MoH pair of `train_moh_pair` on the text task: both models are 2 softmax layers × 8 heads of dim 8 (width 64,
#: MLP 256) with the text twins' recipe; the MoH model has 2 shared heads and the top-3 of 6 routed heads per token
#: (5 of 8 heads active) and differs from its MHA twin only in its routers (+1,280 parameters, +1.0%).
MOH_PAIR: dict[str, dict] = {
    "text-moh": {"kind": "moh", "heads": 8, "moh_shared": 2, "moh_active": 3},
    "text-mha": {"kind": "softmax", "heads": 8},
}
_MOH_ONLY = ("moh_shared", "moh_active", "moh_balance_coef")


def moh_pair_params(**overrides) -> dict[str, TwinParams]:
    """The recipes of the MoH pair (MOH_PAIR): `overrides` apply to both models, except the moh_* ones, which apply
    to the MoH model only."""
    pair = {}
    for name, spec in MOH_PAIR.items():
        spec = dict(spec)
        kind = spec.pop("kind")
        mine = {k: v for k, v in overrides.items() if k not in _MOH_ONLY or kind in MOH_STACKS}
        pair[name] = TwinParams.for_task("text", kind, **{**spec, **mine})
    return pair


def unigram_baseline(seq_len: int = 128) -> float:
    """Held-out loss (nats/byte) of a trivial model: the training text's byte frequencies (add-one smoothed), scored on
    the same targets as `evaluate` (every byte after the BOS of each held-out window)."""
    counts = torch.bincount(text_bytes(TEXT_TRAIN), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = text_eval_windows(text_bytes(TEXT_HELDOUT), seq_len)[:, 1:].reshape(-1)
    return float(-logp[targets].mean())


def train_moh_pair(out_dir: Path | str = MOH_TWINS_DIR, *, steps: int | None = None, force: bool = False,
                   progress: bool = True, threads: int | None = 2, **overrides) -> dict:
    """Train the MoH model and its MHA twin (MOH_PAIR; same data, steps, recipe) into `out_dir/<name>/`.

    Each is an HF folder + run.json + README.md model card (`train_twin`); finished ones (with run.json) are kept
    unless `force` — a finished one trained with another recipe is refused (ValueError), so the pair stays a pair.
    Writes `out_dir/summary.json` (returned) and an index README.md: per model n_params, held-out loss and bits/byte,
    training seconds; the MoH model's routing on the held-out text (`routing_stats`); a unigram baseline.

    Args:
        steps: training steps of both (None: the text twins' 1500).
        overrides: further TwinParams fields for both (moh_shared / moh_active / moh_balance_coef: the MoH one only).
    """
    out = Path(out_dir)
    if steps is not None:
        overrides["steps"] = steps
    records: dict[str, dict] = {}
    for name, params in tqdm(list(moh_pair_params(**overrides).items()), desc="moh pair", disable=not progress):
        folder = out / name
        record = read_json(folder / "run.json", missing_ok=True) if not force else None
        if record is not None:
            if not same_recipe(record["params"], params):
                raise ValueError(f"{folder} holds {name} trained with another recipe ({record['params']}): pass "
                                 "force=True to retrain it, or another out_dir")
            records[name] = record
            continue
        records[name] = train_twin(params, folder, progress=progress, threads=threads, name=name,
                                   trained_by="`headlab.models.linear.train.train_moh_pair`")
    summary = moh_summary(records)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "README.md", moh_summary_markdown(summary))
    write_json(out / "summary.json", summary)
    return summary


def same_recipe(saved: dict, params: TwinParams) -> bool:
    """Whether a run.json's params are `params` (fields added to TwinParams since it was written count at their
    defaults)."""
    want = json.loads(json.dumps(asdict(params)))
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(TwinParams) if f.default is not MISSING}))
    return {**{k: defaults[k] for k in want if k not in saved and k in defaults}, **saved} == want


def moh_summary(records: dict[str, dict]) -> dict:
    """summary.json of a MoH pair from the two run.json records."""
    models = {}
    for name, r in records.items():
        p, ev = r["params"], r["eval"]
        models[name] = {"kind": p["kind"], "layer_kinds": r["layer_kinds"], "heads": p["heads"],
                        "head_dim": p["hidden"] // p["heads"], "hidden": p["hidden"], "mlp": p["mlp"],
                        "moh": r.get("moh"), "n_params": r["n_params"], "heldout_loss": ev["heldout_loss"],
                        "heldout_bits_per_byte": ev["heldout_bits_per_byte"], "train_text_loss": ev["train_text_loss"],
                        "final_train_loss": r["final_train_loss"], "train_seconds": r["train_seconds"],
                        "threads": r["threads"], "routing": ev.get("routing")}
    moh, mha = (next(n for n, m in models.items() if (m["moh"] is not None) == want) for want in (True, False))
    p = records[moh]["params"]
    recipe = {k: v for k, v in p.items() if k not in ("kind", *_MOH_ONLY)}
    return {"task": "text", "moh": moh, "mha": mha, "recipe": recipe, "models": models,
            "n_params_ratio": models[moh]["n_params"] / models[mha]["n_params"],
            "heldout_loss_difference": models[moh]["heldout_loss"] - models[mha]["heldout_loss"],
            "unigram_baseline_heldout_loss": unigram_baseline(p["seq_len"]),
            "torch": records[moh]["torch"]}


def moh_summary_markdown(summary: dict) -> str:
    """The index of a MoH pair's folder (written by `train_moh_pair`)."""
    moh, mha = summary["models"][summary["moh"]], summary["models"][summary["mha"]]
    rc, cfg = summary["recipe"], moh["moh"]
    lines = ["# A Mixture-of-Head model and its multi-head-attention twin", "",
             "Trained here by `headlab.models.linear.train.train_moh_pair` on KJV bytes (trained on John, held out:",
             f"Genesis 1–15) with one recipe: {rc['steps']} steps × batch {rc['batch']} × {rc['seq_len']} bytes, AdamW "
             f"lr {rc['lr']}, seed {rc['seed']}. Both: {len(moh['layer_kinds'])} softmax layers × {moh['heads']} heads "
             f"of dim {moh['head_dim']} (width {moh['hidden']}, MLP {moh['mlp']}). The MoH model routes each token to",
             f"{cfg['shared_heads']} shared heads and the top-{cfg['active_heads']} of {cfg['routed_heads']} routed "
             f"heads per layer; its loss adds {cfg['balance_coef']} × the load-balance loss L_b. Load one with",
             "`headlab.load(\"data/moh-twins/<name>\")`.", "",
             "| model | params | held-out loss (nats/byte) | bits/byte | final train loss | train s |",
             "|---|---|---|---|---|---|"]
    for name in (summary["moh"], summary["mha"]):
        m = summary["models"][name]
        lines.append(f"| {name} | {m['n_params']:,} | {m['heldout_loss']:.4f} | {m['heldout_bits_per_byte']:.4f} | "
                     f"{m['final_train_loss']} | {m['train_seconds']} |")
    lines += ["", f"Parameters MoH / MHA: {summary['n_params_ratio']:.4f}. A unigram byte model scores "
              f"{summary['unigram_baseline_heldout_loss']:.4f} nats/byte on the same targets.", ""]
    routing = moh["routing"]
    lines += [f"Routing of {summary['moh']} on the held-out text ({routing['tokens']:,} tokens): mean L_b "
              f"{routing['balance']:.4f} (K = {cfg['active_heads']} at perfect balance), mean CV of the routed heads' "
              f"frequencies {routing['cv_routed_frequency']:.4f}, mean routing entropy {routing['routing_entropy']:.4f} "
              "nats; per layer in summary.json and the model card.", "",
              "Training times are wall-clock on a shared 2-core machine (other jobs ran beside them): compare",
              "them only loosely.", ""]
    return "\n".join(lines)


# the MQAR twins' trainer and summary live in mqar_twins.py (which imports this module); their old names here still work
_MQAR_TWINS_NAMES = ("mqar_twin_name", "train_mqar_twins", "mqar_summary", "mqar_summary_markdown")


def __getattr__(name: str):
    if name in _MQAR_TWINS_NAMES:
        from headlab.models.linear import mqar_twins

        return getattr(mqar_twins, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
