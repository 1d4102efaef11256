"""Writes notebooks/attention_sinks.ipynb (no outputs): `python notebooks/make_attention_sinks.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "attention_sinks.ipynb"
ID_PREFIX = "sinks"

CELLS = [
    ("md", """# Attention sinks and attention calibration (ACT)

Yu et al. 2024 (*Unveiling and Harnessing Hidden Attention Sinks*, code GATECH-EIC/ACT) score each key j of a head
by its **column score** s_j = Σ_i A_ij / n_j, the mean attention it receives from the n_j queries that can see it
(n_j = N − j in a causal model). A key with s_j > τ (their code: τ = 0.1) is a *sink*. Sinks at the first token are
well known; ACT finds sinks later in the input too, and **calibrates** chosen heads: sinks keep β = 40% of their
attention and the rest goes to the other keys in proportion. headlab computes column scores from streaming
statistics (`HeadModel.stats`: O(T) memory, never the T×T pattern) and applies the calibration as a scoped head edit.

One caveat is built in: a causal head's last keys are seen by only a few queries, so their column score is a mean
over a handful of rows and passes any threshold by accident. A sink must be seen by at least 32 queries here
(`SinkRule.min_visible`; 1 reproduces ACT's code)."""),
    ("code", """import json
import torch
import headlab as hl
from headlab.analyses.sinks import DATA, SinkParams, column_figure, sink_scan, summary_lines

torch.set_num_threads(1)"""),
    ("md", """## 1. An encoder: all-MiniLM-L6-v2

Eight King James Bible passages (public domain, committed under `data/sinks/`), 160 tokens each; a cut prompt keeps
its closing `[SEP]`."""),
    ("code", """minilm = hl.load("minilm-l6", device="cpu")
enc = sink_scan(minilm, params=SinkParams(n_prompts=8, max_tokens=160), progress=False)
print("\\n".join(summary_lines(enc)))
enc.figure("sink_share")  # share of each head's attention on its sinks"""),
    ("code", """cls_head = enc.top(1, map="first_score")[0][0]
column_figure(enc, cls_head)  # one head's column score per token: [CLS] is the sink"""),
    ("md", """## 2. A causal LM: SmolLM2-135M-Instruct

The bundled weights are a **4-bit (Q4_1) dequantisation** of the instruct model, not the original float weights.
Its tokenizer adds no BOS; the scan puts `<|im_start|>` (the model's BOS id) first. Four passages of 128 tokens keep
the notebook fast; `scripts/sinks_report.py` runs 8 × 160."""),
    ("code", """smol = hl.load("smollm2-135m", device="cpu")
dec = sink_scan(smol, params=SinkParams(n_prompts=4, max_tokens=128), progress=False)
print("\\n".join(summary_lines(dec)))
dec.figure("later_share")  # attention on non-initial sinks: layers 2–8 lean on them"""),
    ("code", """later_head = dec.top(1, map="later_share")[0][0]
column_figure(dec, later_head)  # the non-initial sinks are occurrences of " the\""""),
    ("md", """## 3. Calibration as a head edit

`Calibrate(heads=..., beta=0.4)` is an edit like `Ablate`: inside `with hl.edit(model, ...)` the chosen heads'
patterns are recomputed, A[:, S] ← β·A[:, S] with the removed mass spread over the non-sink keys; leaving the block
restores the model exactly. Below: four heads with the most attention on non-initial sinks, on 24 word-category
items (the sink sets are found per prompt; a sink must be seen by 16 queries, as these prompts are short)."""),
    ("code", """from headlab.analyses.sinks import SinkRule
from headlab.edits.calibrate import Calibrate
from headlab.tasks import build_tasks, correct, encode_items, option_logprobs

task = build_tasks(["categories"], n_calib=2, n_eval=24, seed=0)[0]
print(task.evaluation[0].prompt, task.evaluation[0].options)
items = encode_items(smol, task.evaluation, prepend_bos=True)
heads = [h for h, _ in dec.top(4, map="later_share")]
before = option_logprobs(smol, items)
with hl.edit(smol, Calibrate(heads=heads, beta=0.4, rule=SinkRule(min_visible=16))):  # prompts of ~40 tokens
    after = option_logprobs(smol, items)
print(f"calibrating {', '.join(map(str, heads))}: accuracy {correct(before, items.answer).float().mean():.3f} → "
      f"{correct(after, items.answer).float().mean():.3f}; max |Δ log p| = {(after - before).abs().max():.3f}")
assert torch.equal(option_logprobs(smol, items), before)  # the edit is gone"""),
    ("md", """## 4. The head search and the held-out evaluation

`headlab calibrate` (and `scripts/sinks_report.py`) runs ACT's search on a calibration split of three offline tasks —
few-shot word categories (5 classes), few-shot sentiment of templated reviews, few-shot antonym cloze with a copying
lure; 32 items each — trying the 12 heads of layers 2..28 with the most attention on their sink sets, and evaluates
the chosen set on a disjoint evaluation split (414 items). Two settings: headlab's default (tail rule at 16 queries,
greedy search) and ACT's code exactly (no tail rule, each head tried alone). A run takes 10–15 minutes on a shared
CPU, so the notebook shows the committed summaries of the last report."""),
    ("code", """from headlab.analyses.calibration import accuracy_figure

figures = []
for name, label in (("report.json", "tail rule (16 queries), greedy"),
                    ("report_mv1_independent.json", "ACT's code: no tail rule, heads tried alone")):
    path = DATA / name
    if not path.exists():
        print(f"no {name}: run python scripts/sinks_report.py")
        continue
    cal = json.loads(path.read_text())["calibration"]
    print(f"== {label}: calibration-split baseline {cal['calib_baseline']:.3f} on {cal['n_calib']} items")
    print("calibration accuracy change per tried head:", cal["tried"])
    print("\\n".join(cal["table_text"]), "\\n")
    figures.append(accuracy_figure(cal["tables"], title=f"ACT on smollm2-135m (4-bit) — {label}"))
figures[-1] if figures else None"""),
    ("md", """## What it found

Numbers from `scripts/sinks_report.py` (8 passages × 160 tokens; τ = 0.1; tail rule at 32 queries).

- **First-token sinks are the rule.** all-MiniLM-L6-v2: [CLS] is a sink in 78% of heads (56/72). SmolLM2-135M
  (4-bit dequantised instruct): `<|im_start|>` is a sink in 83% of heads (225/270).
- **SmolLM2's non-initial sink is " the".** 30% of its heads (81/270) have a sink after the first token in at least
  half the prompts; 1380 of the 1485 non-initial sink hits are on " the" (27 of its 85 occurrences, 78 heads), then
  "." and ",". Heads of layers 4–8 (L4H4, L4H5, L5H5, L7H1) give ~2/3 of their attention to such sinks.
- **MiniLM's are not [SEP] or punctuation at τ = 0.1**: its few non-initial sinks (22 hits) are content words in
  layer 5 ("blessed", "heaven", "serpent"). [SEP], "." and ":" appear only under the α/N threshold (α = 5): this
  sentence-embedding model does not reproduce BERT's classic [SEP] sink by the column score.
- **The tail caveat is real**: without the 32-query rule the same SmolLM2 scan counts 4666 non-initial hits, 3181
  of them on tail keys that only a few queries see.
- **Calibration barely moves these tasks.** With the tail rule, no single candidate head improved the calibration
  split (83.3%; each tied or lost one item), so nothing is calibrated; all 12 candidates at once give +0.7 points
  [−0.5, +1.9] on the held-out items. ACT's exact settings keep one head, L10H5, whose sink set is mostly the
  prompt's last "\\n" and "Category" tokens — the tail keys the rule excludes — and it gains +1.4 points [+0.5, +2.7]
  (6 items gained, none lost; all but one on word categories). A small effect, found with two settings tried on a
  96-item calibration split: read it as a lead, not as a reproduction of the paper's gains."""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
