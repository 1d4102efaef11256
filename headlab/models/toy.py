"""The bundled ``toy-induction`` model: a 2-layer attention-only causal LM.

It is a plain Hugging Face ``GPT2LMHeadModel`` whose MLP parameters are all
exactly zero and frozen, so every MLP block outputs exactly 0 and the network
is attention-only (embeddings, LayerNorms, attention, tied unembedding).  It is
trained on CPU in a few minutes on *periodic* sequences

    x[0] = BOS,  x[1 + j] = r[j % d],  r random content tokens, d drawn per sequence

whose repeated part is best predicted by an induction circuit (previous-token
head in layer 0, induction heads in layer 1).  Drawing the period
per sequence prevents the fixed-offset positional shortcut that
"32 random tokens then the same 32" would teach.

Training runs in three phases (``PHASES``) so that the circuit works at every
block length up to the context (256 positions, learned absolute embeddings):
"form" (short sequences at positions 0..64: the circuit forms), "spread" (the same
short sequences placed at random offsets in the context, BOS kept at position 0,
so every learned position embedding is trained cheaply and the previous-token head
works everywhere), "full" (full-context sequences with periods up to 128, so the
induction heads stay sharp among many keys).

The result is stored as an ordinary Hugging Face folder (``config.json`` +
``model.safetensors``) so that any HF-based tool can load it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from headlab.inputs import periodic, repeated_blocks
from headlab.losses import next_token_losses

from headlab.paths import TOY_INDUCTION_DIR  # noqa: E402,F401  (re-exported)

BOS = 0
VOCAB = 128
EVAL_SEED = 1234  # fixed seed of the [BOS]+r+r evaluation set in the model card
EVAL_REP_LEN = 50  # the induction scan's default block length
EVAL_BATCH = 256
# block lengths of the model card's table: 16 .. the longest [BOS] r r that fits the context (1 + 2N <= 256)
EVAL_LENGTHS = (16, 32, 50, 64, 100, 127)

# Training recipe.  Two departures from the "obvious" settings were needed for
# the induction circuit to form within a few hundred CPU steps (found by a small
# sweep; see the model card):
# * init std 0.1 instead of GPT-2's 0.02 (``initializer_range``; only affects the
#   initialisation) -- with 0.02 the model sat for thousands of steps on the
#   "bag of earlier tokens minus recent ones" plateau;
# * periods 8..32 instead of 4..32 -- very short periods make that plateau
#   solution nearly exact; with 4..32 (init 0.1, lr 3e-3) no induction head had
#   formed after 4000 steps.
#   (Periods 16..32 formed it too, but the result only worked for long periods.)
LR = 3e-3
WEIGHT_DECAY = 0.0
INIT_STD = 0.1
TRAIN_PERIOD_RANGE = (8, 32)
TRAIN_THREADS = 2


@dataclass(frozen=True)
class Phase:
    """One phase of the training recipe.

    Attributes:
        name: its name in the logs and training.json.
        steps: optimizer steps.
        batch: sequences per step.
        seq_len: tokens after BOS.
        period_range: the periods d drawn per sequence (inclusive).
        spread: place each sequence at a random offset in the context (position ids BOS=0, then
            o+1 .. o+seq_len), so that every learned position embedding is trained.
    """

    name: str
    steps: int
    batch: int
    seq_len: int
    period_range: tuple[int, int]
    spread: bool = False


# Found by experiment (see the model card): "form" alone is the old recipe, which formed the circuit but
# only for positions < 65 (at N = 50 induction 0.45, second-copy loss 3.5); full-context training from
# scratch sat on the plateau for 600 steps; random offsets from scratch, too, for 1500 steps.
PHASES = (
    Phase("form", 600, 64, 64, TRAIN_PERIOD_RANGE),
    Phase("spread", 1200, 64, 64, TRAIN_PERIOD_RANGE, spread=True),
    Phase("full", 300, 32, 255, (8, 128)),
)

MLP_PARAM_SUFFIXES = ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


# --------------------------------------------------------------------------- model


def toy_config(vocab: int = VOCAB):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=4,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=BOS,
        initializer_range=INIT_STD,
    )


def mlp_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The MLP parameters of a GPT-2 model (name -> parameter)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(MLP_PARAM_SUFFIXES)}


def make_attention_only(model) -> None:
    """Zero every MLP parameter and freeze it, so each MLP outputs exactly 0."""
    with torch.no_grad():
        for p in mlp_parameters(model).values():
            p.zero_()
            p.requires_grad_(False)


# --------------------------------------------------------------------------- data


def periodic_batch(batch: int, seq_len: int, vocab: int, *, generator: torch.Generator,
                   period_range: tuple[int, int] = (4, 32)) -> torch.LongTensor:
    """``[batch, 1 + seq_len]``: BOS followed by a periodic sequence (``headlab.inputs.periodic`` with BOS = 0)."""
    return periodic(batch, seq_len, vocab, generator=generator, period_range=period_range, bos=BOS)


def repeated_batch(batch: int, rep_len: int, vocab: int, *, generator: torch.Generator) -> torch.LongTensor:
    """``[batch, 1 + 2*rep_len]``: ``[BOS] + r + r`` with ``r`` random content tokens (``headlab.inputs``)."""
    return repeated_blocks(torch.arange(1, vocab), batch=batch, block=rep_len, repeats=2, bos=BOS, generator=generator)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross entropy, ``[B, T-1]`` (entry t-1 scores token t)."""
    return next_token_losses(logits, tokens)


# --------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate_induction(
    model,
    *,
    seed: int = EVAL_SEED,
    batch: int = EVAL_BATCH,
    rep_len: int = EVAL_REP_LEN,
    vocab: int | None = None,
) -> dict:
    """Loss on the two copies of ``[BOS]+r+r`` and per-head attention scores.

    The model must have been loaded with ``attn_implementation="eager"`` so that
    ``output_attentions=True`` returns the real attention patterns.

    * ``first_copy_loss``: mean CE of predicting ``x[1..L]`` (the first copy).
    * ``second_copy_loss``: mean CE of predicting ``x[L+2..2L]``; ``x[L+1]``
      (the first token of the second copy) is excluded because at that point
      nothing has repeated yet; it is reported separately as
      ``second_copy_first_token_loss``.
    * ``prev_token_score[l][h]``: mean attention from i to i-1, i = 2..2L.
    * ``induction_score[l][h]``: mean attention from i to i-L+1, i = L+1..2L
      (the token after the previous occurrence of the current token).
    """
    L = rep_len
    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = repeated_batch(batch, L, vocab, generator=g)
    was_training = model.training
    model.eval()
    out = model(tokens, output_attentions=True)
    model.train(was_training)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise RuntimeError("no attention weights returned; load the model with attn_implementation='eager'")
    loss = next_token_loss(out.logits, tokens)  # column t-1 -> target t
    first = loss[:, 0:L].mean().item()  # targets 1..L
    second_first_tok = loss[:, L].mean().item()  # target L+1
    second = loss[:, L + 1 : 2 * L].mean().item()  # targets L+2..2L

    T = tokens.shape[1]
    prev_i = torch.arange(2, T)
    ind_i = torch.arange(L + 1, T)
    prev_scores, ind_scores = [], []
    for att in out.attentions:  # [B, H, T, T]
        att = att.float()
        prev_scores.append(att[:, :, prev_i, prev_i - 1].mean(dim=(0, 2)).tolist())
        ind_scores.append(att[:, :, ind_i, ind_i - L + 1].mean(dim=(0, 2)).tolist())
    return {
        "eval_seed": seed,
        "eval_batch": batch,
        "rep_len": L,
        "first_copy_loss": first,
        "second_copy_loss": second,
        "second_copy_first_token_loss": second_first_tok,
        "uniform_loss": math.log(vocab - 1),
        "prev_token_score": prev_scores,
        "induction_score": ind_scores,
    }


def classify_heads(metrics: dict, threshold: float = 0.3) -> dict:
    """Heads whose prev-token / induction score exceeds ``threshold`` (as "L.H")."""

    def pick(key):
        return [f"{l}.{h}" for l, row in enumerate(metrics[key]) for h, s in enumerate(row) if s > threshold]

    return {"threshold": threshold, "previous_token_heads": pick("prev_token_score"), "induction_heads": pick("induction_score")}


# --------------------------------------------------------------------------- training


def spread_position_ids(tokens: torch.Tensor, n_positions: int, *, generator: torch.Generator) -> torch.LongTensor:
    """Position ids that put each row at a random offset o in the context: BOS at 0, then o+1 .. o+T-1."""
    B, T = tokens.shape
    off = torch.randint(0, n_positions - T + 1, (B, 1), generator=generator)
    pos = torch.arange(T).unsqueeze(0) + off
    pos[:, 0] = 0
    return pos


@torch.no_grad()
def ablated_copy_loss(model, head: tuple[int, int], *, rep_len: int, seed: int = EVAL_SEED,
                      batch: int = EVAL_BATCH) -> float:
    """Second-copy loss of ``[BOS]+r+r`` with one head's output zeroed (its slice of ``c_proj``'s input)."""
    layer, h = head
    width = model.config.n_embd // model.config.n_head
    g = torch.Generator().manual_seed(seed)
    tokens = repeated_batch(batch, rep_len, model.config.vocab_size, generator=g)

    def zero(_module, args):
        x = args[0].clone()
        x[..., h * width:(h + 1) * width] = 0
        return (x,)

    hook = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero)
    try:
        loss = next_token_loss(model(tokens).logits, tokens)
    finally:
        hook.remove()
    return loss[:, rep_len + 1:2 * rep_len].mean().item()


@torch.no_grad()
def head_roles(model, *, rep_len: int = EVAL_REP_LEN, seed: int = EVAL_SEED, batch: int = EVAL_BATCH) -> dict:
    """Per head "L.H": the second-copy loss with it zero-ablated, and (from HF's eager patterns) how far back its
    strongest key most often lies (queries past the first 10 positions)."""
    g = torch.Generator().manual_seed(seed)
    tokens = repeated_batch(batch, rep_len, model.config.vocab_size, generator=g)
    atts = model(tokens, output_attentions=True).attentions
    q = torch.arange(tokens.shape[1])
    out = {}
    for layer, att in enumerate(atts):
        for h in range(att.shape[1]):
            offsets = (q - att[:, h].argmax(-1))[:, 10:]
            out[f"{layer}.{h}"] = {
                "ablated_second_copy_loss": ablated_copy_loss(model, (layer, h), rep_len=rep_len, seed=seed, batch=batch),
                "modal_offset": int(torch.mode(offsets.flatten()).values),
                "modal_offset_share": float((offsets == torch.mode(offsets.flatten()).values).float().mean()),
            }
    return out


def length_table(model, lengths=EVAL_LENGTHS, *, seed: int = EVAL_SEED, batch: int = EVAL_BATCH) -> dict:
    """Per block length N: copy losses, the top layer-1 induction score, the previous-token head's score, and the
    second-copy loss with that head (the top layer-0 previous-token head at ``EVAL_REP_LEN``) zero-ablated."""
    ref = evaluate_induction(model, rep_len=EVAL_REP_LEN, seed=seed, batch=batch)
    prev_row = ref["prev_token_score"][0]
    prev_head = (0, max(range(len(prev_row)), key=prev_row.__getitem__))
    table = {}
    for n in lengths:
        ev = evaluate_induction(model, rep_len=n, seed=seed, batch=batch)
        ind = ev["induction_score"][-1]
        table[str(n)] = {
            "first_copy_loss": ev["first_copy_loss"],
            "second_copy_loss": ev["second_copy_loss"],
            "top_induction": max(ind),
            "top_induction_head": f"{len(ev['induction_score']) - 1}.{max(range(len(ind)), key=ind.__getitem__)}",
            "prev_token": ev["prev_token_score"][0][prev_head[1]],
            "second_copy_loss_prev_ablated": ablated_copy_loss(model, prev_head, rep_len=n, seed=seed, batch=batch),
        }
    return {"prev_token_head": f"{prev_head[0]}.{prev_head[1]}", "lengths": table}


def train_toy_induction(
    out_dir,
    *,
    phases: tuple[Phase, ...] = PHASES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the toy attention-only induction model and save it to ``out_dir``.

    Deterministic for a given ``seed`` (CPU, 2 threads).  Writes the Hugging
    Face folder (``config.json``, ``model.safetensors``, ``generation_config.json``)
    plus ``model_card.md`` and ``training.json``; returns the metrics dict that
    ``training.json`` holds.
    """
    import transformers
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    out_dir = Path(out_dir)
    lr, weight_decay = LR, WEIGHT_DECAY
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        torch.manual_seed(seed)
        config = toy_config()
        # eager attention (not persisted in config.json) so that the in-memory
        # model and the reloaded eager model compute bit-identical logits
        config._attn_implementation = "eager"
        model = GPT2LMHeadModel(config)
        make_attention_only(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        data_gen = torch.Generator().manual_seed(seed + 1)

        losses: list[float] = []
        phase_seconds: dict[str, float] = {}
        load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(total=sum(p.steps for p in phases), desc="toy-induction", disable=not progress)
        for phase in phases:
            if 1 + phase.seq_len > config.n_positions:
                raise ValueError(f"phase {phase.name}: 1 + {phase.seq_len} tokens exceed the context {config.n_positions}")
            tp = time.perf_counter()
            bar.set_description(f"toy-induction [{phase.name}]")
            for _ in range(phase.steps):
                tokens = periodic_batch(phase.batch, phase.seq_len, config.vocab_size, generator=data_gen,
                                        period_range=phase.period_range)
                pos = (spread_position_ids(tokens, config.n_positions, generator=data_gen) if phase.spread
                       else None)
                logits = model(tokens, position_ids=pos).logits
                loss = next_token_loss(logits, tokens).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            phase_seconds[phase.name] = time.perf_counter() - tp
        bar.close()
        train_seconds = time.perf_counter() - t0
        train_cpu_seconds = time.process_time() - c0

        for name, p in mlp_parameters(model).items():
            if p.requires_grad or torch.count_nonzero(p).item():
                raise RuntimeError(f"MLP parameter {name} is not frozen at zero")

        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)

        # Evaluate the *saved* model, loaded the way users will load it, after
        # checking that it reproduces the in-memory model exactly.
        reloaded = GPT2LMHeadModel.from_pretrained(out_dir, attn_implementation="eager", use_kernels=False).eval()
        model.eval()
        probe = periodic_batch(8, 64, config.vocab_size, generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            reload_diff = (model(probe).logits - reloaded(probe).logits).abs().max().item()
        if reload_diff != 0.0:
            raise RuntimeError(f"reloaded model differs from the trained one (max |diff| {reload_diff})")
        ev = evaluate_induction(reloaded)
        heads = classify_heads(ev)
        by_length = length_table(reloaded)
        roles = head_roles(reloaded)
        wall_seconds = time.perf_counter() - t0

        tail = losses[-20:] if losses else [float("nan")]
        first10, last10 = losses[:10] or [float("nan")], losses[-10:] or [float("nan")]
        metrics = {
            "model": "toy-induction",
            "settings": {
                "phases": [asdict(p) for p in phases],
                "steps": sum(p.steps for p in phases),
                "seed": seed,
                "vocab": config.vocab_size,
                "n_positions": config.n_positions,
                "bos_token_id": BOS,
                "init_std": INIT_STD,
                "attn_implementation": "eager",
                "optimizer": "AdamW",
                "lr": lr,
                "weight_decay": weight_decay,
                "torch_num_threads": TRAIN_THREADS,
                "init": f"torch.manual_seed({seed})",
                "data_generator_seed": seed + 1,
                "loss": "next-token cross entropy, all positions",
            },
            "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean_last_20": sum(tail) / len(tail),
            "loss_first_10_mean": sum(first10) / len(first10),
            "loss_last_10_mean": sum(last10) / len(last10),
            "loss_curve_every_25": losses[::25],
            "reload_max_abs_diff": reload_diff,
            "eval": ev,
            "eval_by_length": by_length,
            "head_roles": roles,
            "heads": heads,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_trainable_params": sum(p.numel() for p in params),
            "train_seconds": train_seconds,
            "phase_seconds": phase_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "machine": {
                "cpu_count": os.cpu_count(),
                "load_average_1min_at_start": load_at_start,
                "platform": platform.platform(),
            },
            "wall_seconds": wall_seconds,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }
        (out_dir / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
        from headlab.models.toy_card import model_card  # imported here: toy_card imports this module

        (out_dir / "model_card.md").write_text(model_card(metrics))
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
