"""Writes notebooks/retrieval_heads.ipynb (no outputs): `python notebooks/make_retrieval_heads.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "retrieval_heads.ipynb"
ID_PREFIX = "retrieval"

CELLS = [
    ("md", """# Retrieval heads and RazorAttention on SmolLM2-135M

**Wu et al. 2024** find that a few attention heads do the copy-paste of long-context retrieval: during
greedy decoding their top-1 key sits in the needle, on the token being generated. **RazorAttention**
keeps the full KV cache only for such heads (picked by echo and induction scores on repeated random
tokens) and gives every other head sinks, a recent window and one compensation token.

Here on a small grid (prompts of 256 and 512 tokens, one needle, two depths) so that it runs in about
a minute on a CPU; `headlab scan retrieval` (or `scripts/retrieval_report.py`) runs the full grid.
The weights are a 4-bit (Q4_1) dequantisation of SmolLM2-135M-Instruct, not the original float weights."""),
    ("code", """import torch
import headlab as hl
from headlab.analyses.razor import RazorParams
from headlab.analyses.retrieval import RetrievalParams, retrieval_scan

torch.set_num_threads(1)
model = hl.load("smollm2-135m")
print(model)"""),
    ("md", """## 1. The needle harness

A needle sentence goes into King James Bible text at a depth; the chat-formatted question asks for it;
the model answers greedily with a KV cache. At each decode step every head's top-1 key on the decode
row is checked: inside the needle span and equal to the token just generated earns the head 1/|span|.
Only replies with ROUGE-1 recall > 0.5 count. Masking (top-K retrieval heads against K random heads,
attention made uniform) and the KV policies act during decoding only: every condition decodes from a
copy of the same prefilled cache."""),
    ("code", """params = RetrievalParams(lengths=(256, 512), depths=(25.0, 75.0), needles=(0,), max_new_tokens=32,
                         ks=(10,), draws=1, windows=(32,), razor=RazorParams(block=128))
report = retrieval_scan(model, params, progress=False)
meta = report.scores.meta
print(f"{meta['n_counted']}/{meta['n_trials']} trials recalled the needle")
print(f"heads with retrieval score > 0.1: {meta['share_above_0_1']:.1%} (the paper: 3–6%)")
print("top heads:", ", ".join(f"{h} {v:.2f}" for h, v in report.scores.top(6)))
for rec in report.records:
    if rec["condition"] == "baseline":
        print(f"  {rec['prompt_tokens']} tokens, depth {rec['depth']:g}%: {rec['reply']!r}")"""),
    ("code", """figs = report.figures()
figs["retrieval_heatmap"]"""),
    ("code", """figs["needle_accuracy"]"""),
    ("md", """## 2. Are they causal? Top-K against random-K masking

The ten highest-scoring heads are masked (uniform attention over the cache at every decode step),
against ten heads drawn outside the top 10% of the ranking."""),
    ("code", """for name, row in report.summary.items():
    print(f"{name:<20} recall {row['accuracy']:.2f}  KV kept {row['kv_fraction']:.0%}")
figs["masking"]"""),
    ("md", """## 3. RazorAttention: which heads may forget

Echo and induction scores on `[BOS] r r r r` (128 random tokens, repeated 4 times) pick the retrieval
KV heads: the top 14% by induction ∪ the top 1% by echo, of 30 layers × 3 KV heads."""),
    ("code", """razor = report.razor
print("retrieval KV heads (layer, group):", sorted(meta["retrieval_kv"]))
print("top induction heads:", ", ".join(f"{h} {v:.2f}" for h, v in razor.top(5, map="induction")))
razor.figure("induction_kv")"""),
    ("md", """`razor-w32` keeps the full cache for those heads and 4 sinks + 32 recent tokens + one compensation
token for every other KV head; `window-w32` gives that restricted cache to every head."""),
    ("code", """figs["kv_accuracy"]"""),
    ("md", """## What this shows

The small grid above is a sketch; the full grid (`scripts/retrieval_report.py`: prompts of 512 to
4096 tokens, three needles, depths 10/50/90, 36 trials; about 50 minutes of a shared CPU) found:

- **Sparse.** 5.9% of the 270 heads score above 0.1 and 2.2% above 0.5 (the paper: 3–6% above 0.1).
  The top ones, L17H3 (0.77), L23H2, L18H6, L18H7, L17H4, are the model's induction heads.
- **Causal.** Masking the top 5 retrieval heads during decoding drops mean recall from 0.89 to 0.21;
  masking 5 random heads (three draws) leaves 0.79–0.92. Top 10: 0.17 against 0.76–0.90.
- **RazorAttention.** Echo/induction scores pick 14 of 90 KV heads, and they cover the heads that
  score highest on retrieval. With a fixed 256-token window the compressed cache keeps 60% of the KV
  entries at 512 tokens with recall 0.97 (full: 0.99), but recall falls to 0.34 and 0.25 at 2k and
  4k tokens (27% and 21% kept): on this 135M model the other heads also need the far context. The
  paper's window rule max(S0, N/5) (S0 = 64) keeps about a third of the cache at every length, for
  recall 0.59 over the grid (full cache 0.89); the same policy on every head, retrieval heads
  included, keeps 23% for 0.39. The retrieval heads are needed, but on this model not sufficient."""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
