"""The MQAR twins (data/mqar-twins): one model per twin kind, width and short convolution, trained on multi-query
associative recall (task "mqar") at length 256 and evaluated at 256–2048, with a summary (accuracy per kind × length,
state sizes) and its README table.

The recipe, the trainer of one model and the evaluation are train.py's (`TwinParams.for_task("mqar", kind)`,
`train_twin`, `evaluate_mqar`); this module runs them over kinds × widths (`train_mqar_twins`, resumable) and writes
the folder's summary.json and README.md (`mqar_summary`, `mqar_summary_markdown`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from headlab.models.linear import train as _train
from headlab.models.linear.config import STACKS
from headlab.models.linear.train import MQAR, MQAR_EVAL_SEED, MQAR_EVAL_SEQUENCES, TwinParams, same_recipe
from headlab.paths import MQAR_TWINS_DIR
from headlab.results import read_json, write_atomic, write_json

def mqar_twin_name(kind: str, hidden: int, short_conv: int = 0) -> str:
    """`<kind>-h<hidden>`, or `<kind>-conv<K>-h<hidden>` with a short convolution of kernel K."""
    return f"{kind}-conv{short_conv}-h{hidden}" if short_conv else f"{kind}-h{hidden}"


def train_mqar_twins(out_dir: Path | str = MQAR_TWINS_DIR, *, kinds: Iterable[str] = tuple(STACKS),
                     hiddens: Iterable[int] = (64,), steps: int | None = None, force: bool = False,
                     progress: bool = True, threads: int | None = 1, **overrides) -> dict:
    """Train one MQAR model per (kind, width) into `out_dir/<kind>-h<hidden>/` and summarise them; returns the summary.

    Every model has the same recipe (`TwinParams.for_task("mqar", kind)`: 2 layers × 4 heads, attention-only, trained
    at length 256 on `mqar_pairs` pairs) but its mixer and the position option that goes with it (`mqar_position`:
    RoPE on softmax layers, none for linear stacks); the width sets the head dim D and with it the state. Each is
    evaluated at MQAR_EVAL_LENGTHS (`evaluate_mqar`). Finished models (with run.json) are kept unless `force`; one
    trained with another recipe is refused (ValueError), so the folder stays one comparison. Writes
    `out_dir/summary.json` (returned) and README.md over every MQAR model in the folder.

    Args:
        kinds: twin kinds (keys of STACKS).
        hiddens: model widths (head dim = hidden / 4).
        steps: training steps (None: the task's default).
        threads: torch threads while training (1 by default: these small models ran ~5× faster on one thread than on
            two on a shared 2-core machine).
        overrides: further TwinParams fields for every model (mqar_pairs, mqar_vocab, lr, batch, ...).
    """
    out = Path(out_dir)
    if steps is not None:
        overrides["steps"] = steps
    jobs = [(kind, hidden) for hidden in hiddens for kind in kinds]
    for kind, hidden in tqdm(jobs, desc="mqar twins", disable=not progress):
        params = TwinParams.for_task(MQAR, kind, **{"hidden": hidden, **overrides})
        name = mqar_twin_name(kind, hidden, params.short_conv)
        folder = out / name
        record = read_json(folder / "run.json", missing_ok=True) if not force else None
        if record is not None:
            if not same_recipe(record["params"], params):
                raise ValueError(f"{folder} holds {name} trained with another recipe ({record['params']}): pass "
                                 "force=True to retrain it, or another out_dir")
            continue
        _train.train_twin(params, folder, progress=progress, threads=threads, name=name,
                          trained_by="`headlab.models.linear.mqar_twins.train_mqar_twins`")
    summary = mqar_summary(out)
    write_json(out / "summary.json", summary)
    write_atomic(out / "README.md", mqar_summary_markdown(summary))
    return summary


def mqar_summary(out_dir: Path | str = MQAR_TWINS_DIR) -> dict:
    """summary.json of an MQAR twins folder, from every `*/run.json` of task "mqar" in it: per model its recipe
    differences, state sizes and accuracy by evaluation length, and `table` (one row per model)."""
    records = [read_json(run) for run in sorted(Path(out_dir).glob("*/run.json"))]
    records = [r for r in records if r["params"]["task"] == MQAR]
    if not records:
        raise FileNotFoundError(f"no MQAR model (run.json of task {MQAR!r}) under {out_dir}")
    models, table = {}, []
    for r in records:
        p, ev = r["params"], r["eval"]
        head_dim = p["hidden"] // p["heads"]
        linear = [s["state"] for s in r["state"] if "state" in s]
        kv = [s["kv_cache_per_token"] for s in r["state"] if "kv_cache_per_token" in s and "kv_cache_max" not in s]
        conv = p.get("short_conv", 0)
        m = {"kind": p["kind"], "layer_kinds": r["layer_kinds"], "position": p["position"], "hidden": p["hidden"],
             "short_conv": conv, "heads": p["heads"], "head_dim": head_dim, "n_params": r["n_params"],
             "state": r["state"],
             # per head, largest layer: a linear layer's F×D state; softmax layers: their KV cache grows per token
             "state_per_head": max(linear) if linear else None,
             "kv_cache_per_token_per_head": max(kv) if kv else None,
             # a decode step also needs the last K − 1 inputs of the q, k, v convolutions: (K − 1)(2·D_qk + D) per head
             "conv_state_per_head": (conv - 1) * (2 * _qk_dim(r, head_dim) + head_dim) if conv else 0,
             "accuracy": {k: v["accuracy"] for k, v in ev["lengths"].items()},
             "loss": {k: v["loss"] for k, v in ev["lengths"].items()},
             "train_distribution_accuracy": ev["train_distribution"]["accuracy"],
             "train_seconds": r["train_seconds"], "threads": r["threads"], "final_train_loss": r["final_train_loss"],
             "steps": p["steps"]}
        models[r["name"]] = m
        table.append({"model": r["name"], "kind": m["kind"], "short_conv": conv, "hidden": m["hidden"],
                      "head_dim": head_dim,
                      "position": m["position"], "state_per_head": m["state_per_head"],
                      "kv_cache_per_token_per_head": m["kv_cache_per_token_per_head"],
                      "conv_state_per_head": m["conv_state_per_head"],
                      "acc_train_dist": round(m["train_distribution_accuracy"], 4),
                      **{f"acc_{k}": round(v, 4) for k, v in m["accuracy"].items()},
                      "train_s": r["train_seconds"]})
    p0 = records[0]["params"]
    recipe = {k: v for k, v in p0.items() if k not in ("kind", "position", "hidden", "short_conv")
              and not k.startswith("moh_") and k != "period_range"}
    lengths = list(records[0]["eval"]["lengths"])
    return {"task": MQAR, "recipe": recipe,
            "eval": {"lengths": [int(k) for k in lengths], "sequences_per_length": MQAR_EVAL_SEQUENCES,
                     "pairs": p0["mqar_pairs"], "queries_per_sequence": p0["mqar_pairs"], "seed": MQAR_EVAL_SEED,
                     "train_queries": TwinParams(**{**p0, "period_range": tuple(p0["period_range"])}).train_queries,
                     "regime": "the training's pairs, each key queried once, spread uniformly over the longer "
                               "sequence with filler (only the distance to the pairs grows)",
                     "chance": {"uniform_value": 2 / p0["mqar_vocab"], "value_in_context": 1 / p0["mqar_pairs"]}},
            "models": models, "table": table, "torch": records[0]["torch"]}


def _qk_dim(record: dict, head_dim: int) -> int:
    """The q/k width per head of a run's largest q/k (BASED's based_feature_dim is head_dim in these twins)."""
    based = [s for s in record["state"] if s["kind"] == "based"]
    # BASED's Taylor map has 1 + d + d² features: recover d
    return max([head_dim] + [int(round((-1 + (4 * s["feature_dim"] - 3) ** 0.5) / 2)) for s in based])


def mqar_summary_markdown(summary: dict) -> str:
    """The index of an MQAR twins folder (written by `train_mqar_twins`): accuracy by kind × length × width."""
    rc, ev = summary["recipe"], summary["eval"]
    lengths = [str(n) for n in ev["lengths"]]
    lines = ["# MQAR twins: multi-query associative recall at length", "",
             "Trained here by `headlab.models.linear.mqar_twins.train_mqar_twins`, one model per twin kind with one recipe: "
             f"{rc['steps']} steps × batch {rc['batch']} × {rc['seq_len']} tokens, AdamW lr {rc['lr']} (warm-up "
             f"{rc['warmup']}, cosine to 10%), init std {rc['init_std']}, seed {rc['seed']}; 2 layers × {rc['heads']} "
             "heads, attention-only. Rows with conv K add a short causal depthwise convolution of kernel K (no bias, "
             "then SiLU, as fla's GLA / DeltaNet) on every layer's q, k and v projections "
             "(`HeadlabLinearConfig.short_conv`); conv — is the recipe without it. Task (`headlab.inputs.mqar`, "
             "Zoology's MQAR): vocabulary "
             f"{rc['mqar_vocab']} (keys and values from disjoint halves, token 0 the filler), {ev['pairs']} key-value "
             f"pairs `k1 v1 k2 v2 …`, then {ev['train_queries']} queries `k v` at random places among filler in the "
             "rest of the sequence (keys asked again); the loss reads only the answers. Positions: RoPE on the "
             "softmax layers (softmax; BASED's sliding-window layer), none on the linear ones (`mqar_position`). "
             "Column `train dist.`: accuracy on held-out sequences drawn like the training ones.", "",
             f"Evaluation: {ev['sequences_per_length']} held-out sequences per length, the same {ev['pairs']} pairs, "
             "each key queried once, the queries spread uniformly over the sequence with filler between them (only "
             "the distance from the pairs to their queries grows). Accuracy = the queried value is the argmax "
             f"prediction at its key. Chance: {ev['chance']['uniform_value']:.4f} (a uniform value), "
             f"{ev['chance']['value_in_context']:.4f} (a value of the context).", "",
             "State per head: what a linear layer keeps, F × D floats (its largest layer); a softmax layer's KV "
             "cache instead grows by 2·D floats per token (BASED's window layer keeps at most its window of it). "
             "With conv K every layer also keeps its last K − 1 q, k, v inputs to the convolution, (K − 1)(2·D_qk + D) "
             "floats per head (the `+ … conv` part).", "",
             "| model | kind | conv | width | layers | positions | params | state per head | KV cache per token per head "
             "| train dist. | " + " | ".join(f"acc @ {n}" for n in lengths) + " | train s |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(lengths) + "---|"]

    def order(item):
        m = item[1]
        return m.get("short_conv", 0), m["hidden"], list(STACKS).index(m["kind"]) if m["kind"] in STACKS else 99

    for name, m in sorted(summary["models"].items(), key=order):
        conv, extra = m.get("short_conv", 0), m.get("conv_state_per_head", 0)
        state = " + ".join([str(m["state_per_head"])] * bool(m["state_per_head"]) + [f"{extra} conv"] * bool(extra)) or "—"
        lines.append(f"| {name} | {m['kind']} | {conv or '—'} | {m['hidden']} | {'+'.join(m['layer_kinds'])} | "
                     f"{m['position']} | {m['n_params']:,} | {state} | {m['kv_cache_per_token_per_head'] or '—'} | "
                     f"{m['train_distribution_accuracy']:.4f} | " + " | ".join(f"{m['accuracy'][n]:.4f}" for n in lengths)
                     + f" | {m['train_seconds']} |")
    lines += ["", "Training times are wall-clock on a shared 2-core machine (other jobs ran beside them): compare",
              "them only loosely.", ""]
    return "\n".join(lines)
