"""The model card of the bundled ``toy-induction`` model, rendered from its training metrics."""

from __future__ import annotations

from headlab.models.toy import PHASES, Phase


def _fmt_table(scores: list[list[float]]) -> str:
    n_heads = len(scores[0])
    head = "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |"
    sep = "|---|" + "---|" * n_heads
    rows = [f"| {l} | " + " | ".join(f"{s:.3f}" for s in row) + " |" for l, row in enumerate(scores)]
    return "\n".join([head, sep, *rows])


def _command(s: dict) -> str:
    cmd = "python scripts/train_toy_induction.py"
    if s["seed"] != 0:
        cmd += f" --seed {s['seed']}"
    if [Phase(**{**p, "period_range": tuple(p["period_range"])}) for p in s["phases"]] != list(PHASES):
        cmd = (f"python -c 'from headlab.models.toy import *; train_toy_induction(TOY_INDUCTION_DIR, "
               f"seed={s['seed']}, phases=(...))'  # phases as in the table below")
    return cmd


def _phase_rows(m: dict) -> str:
    secs = m.get("phase_seconds", {})
    rows = []
    for p in m["settings"]["phases"]:
        where = "random offset in the context, BOS at 0" if p["spread"] else f"0..{p['seq_len']}"
        lo, hi = p["period_range"]
        rows.append(f"| {p['name']} | {p['steps']} | {p['batch']} | 1 + {p['seq_len']} | {lo}..{hi} | {where} | "
                    f"{secs.get(p['name'], float('nan')):.0f} s |")
    return "\n".join(rows)


def _role_rows(m: dict) -> str:
    return "\n".join(f"| {h} | {r['modal_offset']} ({r['modal_offset_share']:.0%}) | {r['ablated_second_copy_loss']:.3f} |"
                     for h, r in m["head_roles"].items())


def _length_rows(m: dict) -> str:
    rows = []
    for n, e in m["eval_by_length"]["lengths"].items():
        rows.append(f"| {n} | {e['top_induction']:.2f} ({e['top_induction_head']}) | {e['prev_token']:.2f} | "
                    f"{e['first_copy_loss']:.2f} | {e['second_copy_loss']:.3f} | {e['second_copy_loss_prev_ablated']:.2f} |")
    return "\n".join(rows)


def _fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def model_card(m: dict) -> str:
    s, ev, hd = m["settings"], m["eval"], m["heads"]
    L = ev["rep_len"]
    prev_heads = ", ".join(hd["previous_token_heads"]) or "none"
    ind_heads = ", ".join(hd["induction_heads"]) or "none"
    prev = m["eval_by_length"]["prev_token_head"]
    return f"""# toy-induction

A 2-layer **attention-only** causal language model with a genuine induction
circuit (one previous-token head in layer 0 feeding induction heads in
layer 1) that works at every block length up to its context, small enough to
train on a CPU in a few minutes.  It is stored as an
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

`transformers.GPT2LMHeadModel` with `GPT2Config(vocab_size=128, n_positions={s['n_positions']},
n_embd=64, n_layer=2, n_head=4, n_inner=4, activation_function="gelu_new",
resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=True,
bos_token_id=0, eos_token_id=0, initializer_range={s['init_std']})`; {m['n_params']} parameters
({m['n_trainable_params']} trained), float32.  `initializer_range` only sets the
initialisation std.  Learned absolute position embeddings, all {s['n_positions']} of them trained.

**Attention-only:** every MLP parameter (`mlp.c_fc.weight`, `mlp.c_fc.bias`,
`mlp.c_proj.weight`, `mlp.c_proj.bias`, in both layers) is exactly zero and was
frozen (`requires_grad=False`) for the whole of training, so each MLP block
outputs exactly 0 and the residual stream is written only by the embeddings and
the attention heads.  (`ln_2` therefore has no effect.)  The zeroed MLPs are
kept only so that the checkpoint is a standard GPT-2 that every tool
understands.

Vocabulary: token 0 is BOS (also used as EOS); tokens 1..127 are content
tokens.  There is no tokenizer: feed token ids.

## How it was made

```
{_command(s)}
```

(`headlab.models.toy.train_toy_induction`; deterministic for a seed on CPU with
the same torch build.)

* Data: `headlab.models.toy.periodic_batch` -- a BOS and then T tokens,
  `x[0]=BOS, x[1+j]=r[j % d]`, with `r` random content tokens and the period
  `d` drawn per sequence.  Varying the period stops the model from learning a
  fixed-offset positional shortcut: it has to look up the previous occurrence
  of the current token.
* Three phases, one optimizer (AdamW, lr {s['lr']}, weight decay {s['weight_decay']}),
  `torch.set_num_threads({s['torch_num_threads']})`, seed {s['seed']} (init `torch.manual_seed({s['seed']})`, data
  generator seed {s['data_generator_seed']}), eager attention; loss = next-token cross entropy on all positions:

| phase | steps | batch | tokens | periods | positions | time |
|---|---|---|---|---|---|---|
{_phase_rows(m)}

* Why: "form" alone (the first version of this model) forms the circuit, but
  only positions 0..64 are ever trained, so the previous-token head and with it
  the circuit fail on longer inputs (at N = 50: induction 0.45, second-copy loss
  3.5).  Training on full-context sequences from the start stayed on the
  "a token seen earlier but not recently" plateau for 600 steps, and random
  offsets from the start for 1500 steps.  So the circuit is formed first on short
  sequences, then "spread" trains every position embedding cheaply (short
  sequences placed at random offsets; BOS stays at position 0 as at inference),
  then "full" trains on whole-context sequences so the induction heads stay sharp
  with up to 255 keys to choose from.  Init std {s['init_std']} and periods 8..32 in the first phase:
  with GPT-2's 0.02 or with periods 4..32 the plateau lasted thousands of steps.
* Training loss: {m['initial_loss']:.3f} at step 0 -> {m['final_loss']:.3f} at the last step
  (mean of the last 20 steps {m['final_loss_mean_last_20']:.3f}; the first period of every
  sequence is unpredictable).
* Training time: {m['train_seconds']:.0f} s wall, {m['train_cpu_seconds']:.0f} s CPU, on {m['machine']['cpu_count']} CPU cores
  with a 1-minute load average of {_fmt_load(m['machine']['load_average_1min_at_start'])} at the start (torch {m['versions']['torch']},
  transformers {m['versions']['transformers']}).

## Evaluation

{ev['eval_batch']} sequences `[BOS] + r + r`, `r` = N random content tokens
(`torch.Generator().manual_seed({ev['eval_seed']})`), computed by
`headlab.models.toy.evaluate_induction` on the saved folder loaded with
`attn_implementation="eager"` and `output_attentions=True` (HF's own patterns,
not headlab's).  Second-copy loss: targets N+2..2N; previous-token score: mean
attention from i to i-1; induction score: mean attention from second-copy
position i to i-N+1.  "ablated": the second-copy loss with the previous-token
head {prev} zero-ablated (its slice of `c_proj`'s input), which should break the circuit.

| N | top layer-1 induction (head) | prev-token {prev} | first-copy loss | second-copy loss | ablated {prev} |
|---|---|---|---|---|---|
{_length_rows(m)}

`headlab scan induction --model toy-induction` uses N = {L} by default; at N = {L}:

| | mean next-token loss (nats) |
|---|---|
| first copy (predicting x[1..{L}]) | {ev['first_copy_loss']:.3f} |
| second copy (predicting x[{L + 2}..{2 * L}]) | {ev['second_copy_loss']:.3f} |
| first token of the second copy (x[{L + 1}], not predictable by induction) | {ev['second_copy_first_token_loss']:.3f} |
| uniform over content tokens, ln 127 | {ev['uniform_loss']:.3f} |

**Previous-token score** (i = 2..{2 * L}):

{_fmt_table(ev['prev_token_score'])}

**Induction score** (i = {L + 1}..{2 * L}):

{_fmt_table(ev['induction_score'])}

Each head zero-ablated at N = {L} (clean second-copy loss {ev['second_copy_loss']:.3f}), and how far back its
strongest key most often lies (share of queries):

| head | modal offset | second-copy loss, ablated |
|---|---|---|
{_role_rows(m)}

In the seed-0 checkpoint the layer-1 induction heads back each other up; the previous-token head is indispensable, and so
is a layer-0 head that attends two tokens back (the induction heads apparently match the two
preceding tokens: with 127 content tokens, one-token matches are often ambiguous in long blocks).

Heads with score > {hd['threshold']} (named layer.head):

* previous-token heads: {prev_heads}
* induction heads: {ind_heads}

All numbers are also in `training.json`.
"""
