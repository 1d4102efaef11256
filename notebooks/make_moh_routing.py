"""Writes notebooks/moh_routing.ipynb (no outputs): `python notebooks/make_moh_routing.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "moh_routing.ipynb"
ID_PREFIX = "moh"

CELLS = [
    ("md", """# Mixture-of-head routing: heads as experts, chosen per token

MoH (Jin et al. 2024) treats a layer's heads as experts: a few **shared** heads are always on, and of the other
**routed** heads only the top-k per token keep their output. headlab applies this to any softmax model as an edit,
`hl.MoH(active=...)`, inside `hl.edit` — the model is untouched once the block ends, and with every routed head on
the edit is the identity, bit for bit. Two routers:

- **query-norm** (training-free, MoH's LLaMA3 conversion): a routed head's score is the ℓ2 norm of its query at that
  token, standardised over the layer's routed heads;
- **learned**: the same plus a linear function of the layer's input, trained with every model weight frozen.

This notebook checks the analytics on a **planted** router whose answer is known, then looks at SmolLM2-135M: what
routing costs in perplexity, which tokens pick which heads, and the committed conversion sweep against static
pruning. From the command line:

```
headlab moh convert --out runs/moh          # query-norm and trained routers vs static pruning (resumable)
headlab moh analyse --active 0.5 --out runs/moh-routing
headlab moh twin                            # the small MoH model against its MHA twin
```"""),
    ("code", """from pathlib import Path

import torch

import headlab as hl
from headlab.moh import Conversion, TOKEN_TYPES, trace
from headlab.moh.planted import planted_router_model
from headlab.viz.moh import type_lifts

torch.set_num_threads(2)
RESULTS = Path("..") / "benchmarks" / "results" / "moh_smollm2\""""),
    ("md", """## 1. A planted router, recovered

A byte-level model whose embeddings mark punctuation and digits along two known coordinates, and a router whose
hand-set weights read them: punctuation goes to head 3, digits to head 2 (heads 0–1 shared, one routed head per
token). `trace` records every token's gates; `by_type` ranks heads by lift (how much more often a token type picks
a head than tokens overall)."""),
    ("code", """model, moh, planted = planted_router_model()
texts = ["In the beginning, God created the heaven and the earth; 1 2 3 and 45 days!",
         "Verse 12: and he said, 'Let there be light.' 7 + 8 = 15? Yes: 99 of 100."]
routing = trace(model, moh, texts)
flags, gates = routing.flags, routing.gates
for name, head in planted.items():
    rows = flags[:, TOKEN_TYPES.index(name)]
    share = gates[rows, 0, head].float().mean().item()
    print(f"{name}: planted head L0H{head}, on for {share:.0%} of {int(rows.sum())} tokens;",
          "top by lift:", routing.by_type(top=1, min_tokens=3)[name]["top"][0][0])
    assert share == 1.0"""),
    ("code", """ids = routing.scores.items["token_ids"][routing.scores.items["sequence"] == 0].tolist()
routing.token_figure(0, 0, strings=model.token_strings(ids))"""),
    ("md", """## 2. SmolLM2-135M: what routing costs

SmolLM2 has 9 query heads in 3 KV groups per layer. By default the first KV group's 3 heads are shared and the
other 6 routed, so that a token whose 3 routed heads of one group are all off skips reading that group's KV cache.
The query-norm router at each share of routed heads kept, on a passage of held-out text:"""),
    ("code", """lm = hl.load("smollm2-135m")
passage = Path("..") / "data" / "text" / "kjv-john.txt"
ids = lm.encode(passage.read_text()[:2000], truncate=128).input_ids
base = lm.loss(ids).item()
with hl.edit(lm, hl.MoH(active=1.0)):
    assert lm.loss(ids).item() == base  # every routed head on: the identity
for active in (0.5, 0.67, 0.83):
    with hl.edit(lm, hl.MoH(active=active)):
        print(f"{active:.0%} of routed heads: loss {lm.loss(ids).item():.3f} (original {base:.3f})")"""),
    ("md", """## 3. Who picks which head

Half of the routed heads per token (k = 3 of 6): load balance (MoH's L_b = Σ P_i f_i; a perfectly balanced router
gives k / h_r), the routing entropy, the share of KV-group reads saved, and the routed heads each token type picks
most."""),
    ("code", """routing = trace(lm, hl.MoH(active=0.5), [ids[0]])
summary = routing.summary()
{k: v for k, v in summary.items() if k != "by_type"}"""),
    ("code", """type_lifts(routing.by_type(top=3), title="SmolLM2, query-norm router, k = 3 of 6")"""),
    ("md", """## 4. The conversion sweep (committed results)

`headlab moh convert` measured, at each share of routed heads kept, the query-norm router, a router trained for
100 steps on KJV Genesis (only its own parameters), and static pruning of the same number of heads chosen by the
pruning rankers — held-out perplexity on KJV John and accuracy on three multiple-choice tasks."""),
    ("code", """sweep = Conversion.load(RESULTS / "convert")
print(sweep.markdown())
sweep.figure("ppl")"""),
    ("md", """Read it against the two nulls: `moh:random` routes each token to random heads, `prune:random` removes random
heads for good. Without training, the query-norm router is no better than either; a router trained with the model
frozen recovers most of the perplexity at every share — the routing, not the number of heads, carries the gain.

## 5. The small MoH model against its MHA twin

headlab's own model family has MoH layers (`moh_shared_heads`, `moh_active_heads` in the config): shared heads,
top-k routed heads with MoH's gate rescaling, and the load-balance loss. Trained here beside a plain multi-head
twin with the same data, steps and recipe (2 layers × 8 heads, parameters within 1.1%):"""),
    ("code", """import json

twins = json.loads((Path("..") / "data" / "moh-twins" / "summary.json").read_text())
for name, m in twins["models"].items():
    print(f"{name}: {m['n_params']} parameters, held-out loss {m['heldout_loss']:.4f} nats/byte")
moh_model = hl.load(str(Path("..") / "data" / "moh-twins" / twins["moh"]))
own = trace(moh_model, None, ["In the beginning God created the heaven and the earth."])
own.figure()"""),
    ("md", """## 6. Skipping the work of heads that are off

`compute="routed"` makes the seam compute only the (token, head) rows that are on
(`headlab_kernels.routed_attention`: a Triton kernel on CUDA, a gathered torch path elsewhere) — the same logits to
float tolerance. `routed_costs` counts the attention FLOPs and, GQA-aware, the KV-cache reads a decode step would
make."""),
    ("code", """from headlab_kernels.routed_attention import routed_costs

with hl.edit(lm, hl.MoH(active=0.5)):
    dense = lm.forward(ids).logits
with hl.edit(lm, hl.MoH(active=0.5, compute="routed")):
    routed = lm.forward(ids).logits
print("max |routed - dense| logit:", (routed - dense).abs().max().item())
gates = routing.gates[:, 5].float()[None]  # layer 5 of the traced passage: [1, T, H]
{k: v for k, v in routed_costs(gates, lm.n_kv_heads, lm.head_dim).items() if "ratio" in k or "fraction" in k}"""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
