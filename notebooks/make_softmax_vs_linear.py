"""Writes notebooks/softmax_vs_linear.ipynb (no outputs): `python notebooks/make_softmax_vs_linear.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "softmax_vs_linear.ipynb"
ID_PREFIX = "kinds"

CELLS = [
    ("md", """# Softmax heads against linear-attention heads

Why does linear attention trail softmax attention? **Hedgehog** (Zhang et al. 2024) points at two properties of
softmax weights that simple feature maps lose: they are *spiky* (low entropy) and *monotonic* in the dot product
q·k. **RALA** (Fan et al. 2025) points at *rank*: a linear layer reads its past through a state of at most
min(F, D) dimensions. Here every property is measured per head on **twins**: a softmax model and one model per
linear kind (elu+1 linear, Hedgehog, BASED = sliding-window softmax + Taylor linear, GLA, DeltaNet), trained in this
repository on the same data with the same recipe (2 layers × 4 heads, width 64), differing only in their mixers.
For a linear head every measure reads its **implicit pattern** A, the matrix the layer applies to v (A @ v is the
layer's output, checked below).

`headlab.analyses.kinds.head_metrics` gives per head: `entropy` (nats; of |A| renormalised per row for the
unnormalised GLA and signed DeltaNet patterns) and `norm_entropy` (÷ log of the visible keys: 0 = one key,
1 = uniform), `monotonicity` (Spearman correlation of each row with the raw q·k), `pattern_rank` (singular values
holding 99% of ‖A‖²_F; `pattern_rank_frac` = ÷ T), `state_rank` of a linear layer's final state out of
`state_dim` = min(F, D), and the `induction` / `prev_token` scores of the repeated-random-tokens scan."""),
    ("code", """import torch
import transformers
from IPython.display import Markdown, display
from headlab.analyses.kinds import (KindParams, compare_kinds, comparison_models, head_patterns, kind_prompts,
                                    markdown_table, pattern_identity_error)
from headlab.models.linear.train import STACKS, TWINS_DIR, summary_table
from headlab.viz.kinds import pattern_grid

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per twin
KINDS = list(STACKS)  # softmax, linear, hedgehog, based, gla, deltanet
missing = [f"{task}-{kind}" for task in ("recall", "text") for kind in KINDS
           if not (TWINS_DIR / f"{task}-{kind}" / "run.json").is_file()]
if missing:
    raise FileNotFoundError(f"twins not trained yet under {TWINS_DIR}: {', '.join(missing)} "
                            "(run `headlab train twins`; finished twins are kept)")
recall = comparison_models(TWINS_DIR, "recall", KINDS)
text = comparison_models(TWINS_DIR, "text", KINDS)
for kind in KINDS:
    print(f"{kind:<9} layers: {' + '.join(recall[kind].layer_kinds)}")"""),
    ("md", """## 1. How well each twin learned

From each folder's `run.json`. **Recall**: `[BOS]` + a periodic sequence of random tokens (period 8–32), next-token
accuracy on the targets of a later copy (what an induction mechanism can predict), 256 held-out sequences per
period. **Text**: next-byte loss on held-out King James Genesis 1–15 (trained on the Gospel of John)."""),
    ("code", """rows = summary_table(TWINS_DIR)
display(Markdown(markdown_table([r for r in rows if r["twin"].startswith("recall-")], digits=4)))
display(Markdown(markdown_table([r for r in rows if r["twin"].startswith("text-")], digits=4)))"""),
    ("md", """## 2. The recall twins, head by head

Sixteen evaluation prompts of period 16 (64 tokens after BOS), the same for every twin. Means over each model's
8 heads (and per layer kind for BASED's hybrid stack). First the shape of the patterns: spikiness, monotonicity,
rank; `row_mass` = Σ_j |A_ij| is 1 for the normalised kinds and shows the scale of GLA's and DeltaNet's rows."""),
    ("code", """SHAPE = ["entropy", "norm_entropy", "monotonicity", "pattern_rank_frac", "state_rank", "state_dim",
         "row_mass"]
RECALL = ["induction", "induction_share", "induction_top1", "prev_token_share", "prev_token_top1",
          "induction_share_max"]
recall_cmp = compare_kinds(recall, KindParams(source="recall", n_prompts=16, seq_len=65, period=16),
                           progress=False)
display(Markdown(recall_cmp.to_markdown(SHAPE)))"""),
    ("md", """Then the recall circuit on `[BOS] r r`, |r| = 24. `induction` is the induction scan's score, a raw pattern
entry: for GLA and DeltaNet it is on the scale of `row_mass`, so the comparable numbers are `induction_share`
(|A| at the induction key over the row's Σ|A|) and `induction_top1` (how often that key is the row's largest)."""),
    ("code", """display(Markdown(recall_cmp.to_markdown(RECALL)))"""),
    ("code", """recall_cmp.figure("norm_entropy")  # spikiness: low = few keys"""),
    ("code", """recall_cmp.figure("monotonicity")  # softmax and swa are 1 by construction"""),
    ("code", """recall_cmp.figure("pattern_rank_frac")"""),
    ("code", """recall_cmp.figure("state_rank")  # linear layers only, out of state_dim = 16"""),
    ("code", """recall_cmp.figure("induction_top1")"""),
    ("md", """## 3. One induction head per kind

Each twin's head with the largest induction share, on the same recall prompt (period 16): induction is the stripe
15 keys left of the diagonal (the key after the previous occurrence of the current token). Signed patterns get a
diverging scale. Printed per kind: max |A @ v − z| / max |z| over its layers, the check that the implicit pattern
is exactly what the layer applies to v."""),
    ("code", """prompt = kind_prompts(KindParams(source="recall", n_prompts=1, seq_len=65, period=16))
best = {kind: sc.top(1, map="induction_share")[0][0] for kind, sc in recall_cmp.scores.items()}
for kind, model in recall.items():
    err = max(pattern_identity_error(model, prompt).values())
    score = recall_cmp.scores[kind].maps["induction_share"][best[kind].layer, best[kind].head]
    print(f"{kind:<9} {best[kind]} induction share {score:.3f}   pattern @ V identity error {err:.1e}")
pattern_grid(head_patterns(recall, prompt, best), tokens=recall["softmax"].token_strings(prompt[0].tolist()),
             titles={k: f"{k} {best[k]}" for k in best}, title="best induction head per kind (recall twins)")"""),
    ("md", """## 4. The text twins

Eight held-out windows of 128 bytes (BOS included); the induction scan on random bytes with |r| = 48."""),
    ("code", """text_params = KindParams(source="text", n_prompts=8, seq_len=128, induction_seq_len=48)
text_cmp = compare_kinds(text, text_params, progress=False)
display(Markdown(text_cmp.to_markdown(SHAPE)))
display(Markdown(text_cmp.to_markdown(RECALL)))"""),
    ("code", """text_cmp.figure("norm_entropy")"""),
    ("code", """text_cmp.figure("monotonicity")"""),
    ("code", """text_cmp.figure("pattern_rank_frac")"""),
    ("code", """text_prompt = kind_prompts(KindParams(source="text", n_prompts=1, seq_len=64))
prev = {kind: sc.top(1, map="prev_token_share")[0][0] for kind, sc in text_cmp.scores.items()}
for kind, model in text.items():
    err = max(pattern_identity_error(model, text_prompt).values())
    score = text_cmp.scores[kind].maps["prev_token_share"][prev[kind].layer, prev[kind].head]
    print(f"{kind:<9} {prev[kind]} previous-token share {score:.3f}   pattern @ V identity error {err:.1e}")
pattern_grid(head_patterns(text, text_prompt, prev), tokens=text["softmax"].token_strings(text_prompt[0].tolist()),
             titles={k: f"{k} {prev[k]}" for k in prev}, title="best previous-token head per kind (text twins)")"""),
    ("md", """## What it found

Recall twins (16 prompts of period 16, `[BOS] r r` with |r| = 24, seed 0; per-head values from the tables above):

- **Recall accuracy follows how sharply a head can find the induction key, not how much mass it puts there.**
  Softmax (recall 0.97) has four layer-1 induction heads giving 0.76–0.80 of their attention to the induction key,
  which is each row's top key 93–96% of the time. BASED matches its accuracy (0.97) with Taylor heads that put only
  0.25–0.27 of their mass there yet rank it first 97–98% of the time; DeltaNet (0.84) ranks it first 51–70% of the
  time with 0.09–0.10 of Σ|A|. elu+1 linear (0.17) and GLA (0.38) never form one (top key 0–16% of the time).
- **Spikiness and monotonicity separate the feature maps as Hedgehog predicts.** Mean normalised entropy: softmax
  0.46, Hedgehog 0.63, BASED's Taylor layer 0.76, elu+1 0.78, GLA 0.85, DeltaNet 0.87. Monotonicity in q·k:
  softmax 1.00 by construction, Hedgehog 0.92–0.94 in layer 0 and 0.73–0.77 in layer 1, DeltaNet ≈ 0.7, BASED's
  Taylor heads 0.54–0.60, GLA 0.18–0.68, and elu+1 *negative* in layer 0 (−0.26 to −0.28): φ(q)·φ(k) grows
  with every k coordinate whatever q's sign, and 71–83% of this twin's q and k coordinates are negative.
- **Linear patterns are lower-rank, and GLA's state is nearly rank 1–2.** 99% of ‖A‖²_F takes 0.49 of T for
  softmax heads, 0.30 for elu+1, 0.37 for Hedgehog, 0.41 for BASED's Taylor heads (its sliding-window layer,
  banded, 0.89); GLA and DeltaNet 0.67–0.69, their signed or decayed rows being far from low-rank. Of the 16
  dimensions of the state, elu+1 uses 4–8, Hedgehog 6–8, DeltaNet 10–12, BASED 12, GLA's layer 1 only 1.3–1.7.
- GLA's rows are unnormalised (Σ_j |A_ij| ≈ 151 on average, DeltaNet's 0.40): its raw `induction` score is on
  that scale (mean −4.2), which is why the shares are the numbers to compare.

Text twins (8 held-out windows of 128 bytes; `[BOS] r r` with |r| = 48 random bytes):

- **Held-out loss orders the kinds differently from recall**: softmax 1.81 nats/byte, GLA 1.83, DeltaNet 1.87,
  BASED 1.91, Hedgehog 1.91, elu+1 1.95. None of these byte models copies random bytes (second-copy loss 8–11
  nats; best induction share 0.015): the induction columns say nothing here.
- **GLA's decay makes it as spiky as softmax on text** (normalised entropy 0.46–0.58 against softmax's 0.41–0.81),
  though only weakly monotonic in q·k (0.16–0.42). Hedgehog keeps its monotonicity (0.86–0.96); elu+1 is again
  anti-monotonic (−0.72 to +0.09), DeltaNet barely monotonic (0.10–0.21), BASED's Taylor heads 0.09–0.47.
- **The states are used even less than on recall**: 2–5 of 16 dimensions for elu+1, 3–7 for Hedgehog, ~4 for GLA,
  5–8 for BASED, 8–10 for DeltaNet, whose delta rule keeps the most of its state."""),
    ("md", """## 5. Multi-query associative recall at length (MQAR twins)

The twins above all have learned absolute positions (65 or 128), so none runs past its training length. The MQAR
twins (`headlab.models.linear.mqar_twins.train_mqar_twins`, committed under data/mqar-twins) have none: RoPE on the
softmax layers (softmax; BASED's sliding-window layer) and no position signal at all in the linear layers
(`HeadlabLinearConfig.position`). One model per kind, the same recipe (2 layers × 4 heads, attention-only),
trained at length 256 on Zoology's MQAR (`headlab.inputs.mqar`): 16 key-value pairs `k v`, then queries `k v` among
filler, the loss on the answers only. Each is evaluated at 256–2048 tokens with the same 16 pairs, each key queried
once, the queries spread over the longer sequence: only the distance from the pairs to their queries grows.
Two sets: the plain twins at width 64 (`<kind>-h64`), and the same recipe with a **short convolution** of kernel 4
on every layer's q, k and v (`HeadlabLinearConfig.short_conv`: causal, depthwise, no bias, then SiLU, as fla's GLA
and DeltaNet and Zoology's configs) at widths 64 and 128 (`<kind>-conv4-h<width>`). The convolution hands each
token its predecessors' features, so a value's position can carry its key and the lookup takes one layer.
`state_per_head` is what a linear layer keeps (F × D floats); a softmax layer's KV cache grows by
`kv_cache_per_token_per_head` floats per token instead (BASED's window layer keeps at most 8 tokens of it); the
convolution adds its last 3 inputs, `conv_state_per_head` floats."""),
    ("code", """import json
import plotly.graph_objects as go
from headlab.paths import MQAR_TWINS_DIR

mqar = json.loads((MQAR_TWINS_DIR / "summary.json").read_text())
display(Markdown(markdown_table(mqar["table"], digits=4)))"""),
    ("code", """import plotly.express as px

lengths = mqar["eval"]["lengths"]
colors = dict(zip(KINDS, px.colors.qualitative.D3))
fig = go.Figure()
for name, m in mqar["models"].items():
    conv = m.get("short_conv", 0)
    fig.add_trace(go.Scatter(x=lengths, y=[m["accuracy"][str(n)] for n in lengths], mode="lines+markers",
                             line=dict(color=colors[m["kind"]], dash="solid" if conv else "dot",
                                       width=3 if m["hidden"] > 64 else 1.5),
                             name=f"{m['kind']} h{m['hidden']}" + (f" conv{conv}" if conv else "")))
fig.add_hline(y=mqar["eval"]["chance"]["value_in_context"], line_dash="dot",
              annotation_text="chance: a value of the context")
fig.update_layout(title="MQAR accuracy vs sequence length (trained at 256; dotted: no conv, thick: width 128)",
                  xaxis=dict(type="log", tickvals=lengths, title="sequence length"),
                  yaxis=dict(title="accuracy on the queried values", range=[0, 1.05]), height=460)
fig"""),
    ("md", """**Accuracy against state size** (Zoology's plot): what each model keeps per head to answer a query at
length L, its largest layer: a linear layer's F × D state, a softmax layer's KV cache 2·D·L (BASED's window layer
at most 2·D·8), plus the K − 1 convolution inputs (K − 1)(2·D_qk + D) with conv. Below at L = 256 (the training
length) and L = 2048."""),
    ("code", """def floats_per_head(m, length):
    kv = max([s["kv_cache_per_token"] * min(length, s["kv_cache_max"] // s["kv_cache_per_token"])
              if "kv_cache_max" in s else s["kv_cache_per_token"] * length
              for s in m["state"] if "kv_cache_per_token" in s], default=0)
    return max(kv, m["state_per_head"] or 0) + m.get("conv_state_per_head", 0)


fig = go.Figure()
for length, symbol in ((256, "circle"), (2048, "diamond")):
    for kind in KINDS:
        for conv in (0, 4):
            ms = [m for m in mqar["models"].values() if m["kind"] == kind and m.get("short_conv", 0) == conv]
            if not ms:
                continue
            ms.sort(key=lambda m: m["hidden"])
            fig.add_trace(go.Scatter(
                x=[floats_per_head(m, length) for m in ms], y=[m["accuracy"][str(length)] for m in ms],
                mode="lines+markers", marker=dict(symbol=symbol, size=9, color=colors[kind]),
                line=dict(color=colors[kind], dash="solid" if conv else "dot"),
                text=[f"h{m['hidden']}" for m in ms], hovertemplate="%{text}: %{x} floats, %{y:.3f}",
                name=f"{kind}{' conv' + str(conv) if conv else ''} @ {length}"))
fig.update_layout(title="MQAR accuracy vs floats kept per head (circles: at 256 tokens, diamonds: at 2048)",
                  xaxis=dict(type="log", title="floats kept per head to decode at that length"),
                  yaxis=dict(title="accuracy", range=[0, 1.05]), height=480)
fig"""),
    ("md", """What it shows (seed 0, one recipe, 1,500 steps × 16 sequences on a CPU):

- **Without a convolution only BASED learns the lookup**: 1.000 at 256–1024 tokens, 0.998 at 2048; its
  sliding-window layer (RoPE over 8 keys) hands the global Taylor layer the previous token of every value. Every other
  plain twin stays on the plateau (training loss ≈ ln 16, accuracy ≤ 0.08, chance 1/16 = 0.0625): a global mixer
  alone did not find that previous-token step in this budget.
- **A short convolution (kernel 4) on q, k, v is that step**: at width 64 softmax (1.000 at 256), Hedgehog (0.906),
  BASED (0.999) and DeltaNet (0.999) learn it, elu+1 partly (0.534); at width 128 all six kinds reach 0.996–1.000
  at 256. GLA at width 64 is the exception: it stays at chance even with the
  convolution (training loss 3.06, above ln 16) and learns at width 128, with the same recipe.
- **Length separates the mixers**: softmax, whose KV cache keeps every token, falls with distance (1.000 → 0.260 at
  2048 for width 64, → 0.565 for 128: RoPE at distances it never saw), and so does elu+1 (→ 0.269 / 0.466), whose
  normalised state dilutes as filler keys pile up, and GLA (→ 0.749 at 128), whose decay forgets. DeltaNet keeps
  0.998 at 2048 from 256 floats per head at width 64 and 1.000 at 128; Hedgehog 0.917 (512 floats) and 1.000 (2,048).
  A fixed state of a few hundred floats per head recalls 16 pairs at 8× the training length where a 65,536-float KV
  cache does not.
- Caveats: one seed, one recipe for all (no per-kind tuning), 16 pairs (a state of 256 floats per head is far from
  full); wall-clock times come from a shared 2-core machine."""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
