"""The model card of the bundled ``toy-induction`` model, rendered from its training metrics."""

from __future__ import annotations

from headlab.models.toy import DEFAULT_STEPS


def _fmt_table(scores: list[list[float]]) -> str:
    n_heads = len(scores[0])
    head = "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |"
    sep = "|---|" + "---|" * n_heads
    rows = [f"| {l} | " + " | ".join(f"{s:.3f}" for s in row) + " |" for l, row in enumerate(scores)]
    return "\n".join([head, sep, *rows])


def _command(s: dict) -> str:
    cmd = "python scripts/train_toy_induction.py"
    if s["steps"] != DEFAULT_STEPS:
        cmd += f" --steps {s['steps']}"
    if s["seed"] != 0:
        cmd += f" --seed {s['seed']}"
    if s["batch"] != 64 or s["seq_len"] != 64:
        cmd = (
            "python -c 'from headlab.models.toy import *; "
            f"train_toy_induction(TOY_INDUCTION_DIR, steps={s['steps']}, seed={s['seed']}, "
            f"batch={s['batch']}, seq_len={s['seq_len']})'"
        )
    return cmd


def _fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def model_card(m: dict) -> str:
    s, ev, hd = m["settings"], m["eval"], m["heads"]
    L = ev["rep_len"]
    prev_heads = ", ".join(hd["previous_token_heads"]) or "none"
    ind_heads = ", ".join(hd["induction_heads"]) or "none"
    short_rows = "\n".join(
        f"| {Ls} | {e['first_copy_loss']:.3f} | {e['second_copy_loss']:.3f} | "
        + " / ".join(f"{x:.2f}" for x in e["induction_score"][1])
        + " |"
        for Ls, e in m["eval_shorter_repeats"].items()
    )
    return f"""# toy-induction

A 2-layer **attention-only** causal language model with a genuine induction
circuit (one previous-token head in layer 0 feeding induction heads in
layer 1), small enough to train on a CPU in about a minute.  It is stored as an
ordinary Hugging Face folder (`config.json`, `generation_config.json`,
`model.safetensors`) that HF-based tools can load, e.g.

```python
from transformers import GPT2LMHeadModel
model = GPT2LMHeadModel.from_pretrained("data/toy-induction", attn_implementation="eager")
```

Other tools (checked with transformer-lens 4.3.0 and nnsight 0.8.1):

* TransformerLens: `TransformerBridge.boot_transformers("data/toy-induction", device="cpu")`
  (from `transformer_lens.model_bridge`) gives the same logits as HF up to
  float32 rounding (~1e-5).
* nnsight: wrap the loaded HF model, `NNsight(GPT2LMHeadModel.from_pretrained(...))`.
  `LanguageModel("data/toy-induction")` refuses to load because the folder has
  no tokenizer (the model works on token ids only).

## Architecture

`transformers.GPT2LMHeadModel` with `GPT2Config(vocab_size=128, n_positions=256,
n_embd=64, n_layer=2, n_head=4, n_inner=4, activation_function="gelu_new",
resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=True,
bos_token_id=0, eos_token_id=0, initializer_range={s['init_std']})`; {m['n_params']} parameters
({m['n_trainable_params']} trained), float32.  `initializer_range` only sets the
initialisation std.

**Attention-only:** every MLP parameter (`mlp.c_fc.weight`, `mlp.c_fc.bias`,
`mlp.c_proj.weight`, `mlp.c_proj.bias`, in both layers) is exactly zero and was
frozen (`requires_grad=False`) for the whole of training, so each MLP block
outputs exactly 0 and the residual stream is written only by the embeddings and
the attention heads.  (`ln_2` therefore has no effect.)  The zeroed MLPs are
kept only so that the checkpoint is a standard GPT-2 that every tool
understands.

Vocabulary: token 0 is BOS (also used as EOS); tokens 1..127 are content
tokens.  There is no tokenizer: feed token ids.  Only positions 0..64 were
trained; longer inputs are out of distribution.

## How it was made

```
{_command(s)}
```

(`headlab.models.toy.train_toy_induction`; deterministic for a seed on CPU with
the same torch build.)

* Data: `headlab.models.toy.periodic_batch` -- a BOS and then {s['seq_len']} tokens,
  `x[0]=BOS, x[1+j]=r[j % d]`, with `r` random content tokens and the period
  `d` drawn per sequence uniformly from {s['period_range'][0]}..{s['period_range'][1]}.  Varying the period
  stops the model from learning a fixed-offset positional shortcut: trained on
  "32 random tokens then the same 32", all layer-0 heads simply attend 31
  positions back and the model fails on repeats of any other length.  Here it
  has to look up the previous occurrence of the current token.
* Training: AdamW, lr {s['lr']}, weight decay {s['weight_decay']}, batch {s['batch']}, {s['steps']} steps,
  `torch.set_num_threads({s['torch_num_threads']})`, seed {s['seed']} (init `torch.manual_seed({s['seed']})`, data
  generator seed {s['data_generator_seed']}), eager attention; loss = next-token cross entropy on
  all positions.
* Why init std {s['init_std']} and periods {s['period_range'][0]}..{s['period_range'][1]}: with GPT-2's default init std
  0.02 (lr 1e-3 or 3e-3), or with periods 4..32, the model stayed for
  thousands of steps on a plateau that predicts "a token seen earlier but not
  recently" (for periodic data that is nearly exact when the period is short)
  and no induction heads formed.  With these settings the induction heads
  form after roughly 300-400 steps.
* Training loss: {m['initial_loss']:.3f} at step 0 -> {m['final_loss']:.3f} at the last step
  (mean of the last 20 steps {m['final_loss_mean_last_20']:.3f}; much of the sequence, the first
  period, is unpredictable).
* Training time: {m['train_seconds']:.1f} s wall, {m['train_cpu_seconds']:.1f} s CPU, on {m['machine']['cpu_count']} CPU cores
  with a 1-minute load average of {_fmt_load(m['machine']['load_average_1min_at_start'])} at the start (torch {m['versions']['torch']},
  transformers {m['versions']['transformers']}).  On an idle 2-core machine the
  {s['steps']} steps take well under a minute.

## Evaluation

{ev['eval_batch']} sequences `[BOS] + r + r`, `r` = {L} random content tokens
(`torch.Generator().manual_seed({ev['eval_seed']})`), computed by
`headlab.models.toy.evaluate_induction` on the saved folder loaded with
`attn_implementation="eager"` and `output_attentions=True`.

| | mean next-token loss (nats) |
|---|---|
| first copy (predicting x[1..{L}]) | {ev['first_copy_loss']:.3f} |
| second copy (predicting x[{L + 2}..{2 * L}]) | {ev['second_copy_loss']:.3f} |
| first token of the second copy (x[{L + 1}], not predictable by induction; below ln 127 because no training period exceeds 32) | {ev['second_copy_first_token_loss']:.3f} |
| uniform over content tokens, ln 127 | {ev['uniform_loss']:.3f} |

**Previous-token score** (mean attention from position i to i-1, i = 2..{2 * L}):

{_fmt_table(ev['prev_token_score'])}

**Induction score** (mean attention from second-copy position i to i-{L}+1, the
token after the previous occurrence of the current token, i = {L + 1}..{2 * L}):

{_fmt_table(ev['induction_score'])}

Heads with score > {hd['threshold']} (named layer.head):

* previous-token heads: {prev_heads}
* induction heads: {ind_heads}

Shorter repeats (same seed and batch, `r` of length L; the circuit is not tied
to one offset):

| L | first-copy loss | second-copy loss | layer-1 induction scores (heads 0/1/2/3) |
|---|---|---|---|
{short_rows}

All numbers are also in `training.json`.
"""
