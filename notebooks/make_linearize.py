"""Writes notebooks/linearize.ipynb (no outputs): `python notebooks/make_linearize.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "linearize.ipynb"
ID_PREFIX = "linearize"

CELLS = [
    ("md", """# Linearizing SmolLM2 head by head: which heads resist, and what keeping them softmax buys

Hedgehog (Zhang et al. 2024) replaces a softmax head by linear attention whose feature map is a small learned MLP,
trained to mimic the head's softmax weights; LoLCATs trains the same kind of map to match the head's outputs.
headlab does this to a pretrained model **head by head**, with every base weight frozen: `headlab linearize build`
records each layer's queries, keys and values on KJV Genesis and fits each head's map (pattern KL + relative output
error), layer by layer. The result is an ordinary HF folder (`model_type` "headlab_linearized") that `hl.load`
opens; its config says which heads stay softmax, so one set of maps gives every hybrid.

```
headlab linearize build                                   # 6-20 min on 2 cores; resumable layer by layer
headlab linearize analyse --linearized DIR/model --out runs/lin --retrieval runs/retrieval
```"""),
    ("code", """import json
from pathlib import Path

import torch

import headlab as hl
from headlab.linearize import TransferParams, train_layer
from headlab.models.linearized import from_base
from headlab.results import HeadScores
from headlab.viz.linearize import error_vs_type, hybrid_curve

torch.set_num_threads(2)
RESULTS = Path("..") / "benchmarks" / "results" / "linearize_smollm2\""""),
    ("md", """## 1. The linearized layer is an honest operator

With identity feature maps (Hedgehog's starting point) the model is a bad language model, but each layer's implicit
pattern is exactly what it applies to the values, and keeping every head softmax gives back the base model bit for
bit."""),
    ("code", """base = hl.load("smollm2-135m")
ids = base.encode((Path("..") / "data" / "text" / "kjv-john.txt").read_text()[:1500], truncate=64).input_ids
lin = hl.HeadModel(from_base(base.hf), base.tokenizer, name="smollm2-identity-maps")
rec = lin.run(ids, layers=[3], with_z=True).records[3]
z = torch.matmul(rec.pattern(), rec.v.repeat_interleave(3, 1).float()).transpose(1, 2)
print("max |pattern @ v - z|:", (z - rec.z.float()).abs().max().item())
print("loss: base", round(base.loss(ids).item(), 3), "| identity maps", round(lin.loss(ids).item(), 3))
lin.hf.set_softmax_heads([list(range(9))] * 30)
print("all heads softmax == base:", torch.equal(lin.forward(ids).logits, base.forward(ids).logits))"""),
    ("md", """## 2. Attention transfer on one layer

Each head's map is trained to make its linear pattern match the softmax pattern; KL (nats per row) and the relative
output error fall within a few dozen steps."""),
    ("code", """run = base.run(ids.repeat(4, 1), layers=[5])
r = run.records[5]
_, _, curve = train_layer(r.q.float(), r.k.float(), r.v.float(), base.head_dim ** -0.5, TransferParams(steps=60))
curve  # (step, mean KL, mean relative output error)"""),
    ("md", """## 3. Which heads resist (committed results on SmolLM2-135M)

The transfer error of every head on held-out KJV John, against the head's type from headlab's own scans of the base
model."""),
    ("code", """report = HeadScores.load(RESULTS / "transfer")
summary = json.loads((RESULTS / "report.json").read_text())
print("hardest heads:", summary["hardest"][:6])
{name: {k: round(v, 3) for k, v in r.items()} for name, r in summary["relate"].items()}"""),
    ("code", """report.figure("rel_error")"""),
    ("code", """error_vs_type(report.maps["rel_error"], report.maps["entropy"], type_name="mean row entropy of the softmax head",
              title="transfer error against the head's entropy")"""),
    ("md", """## 4. Keeping the hardest heads softmax

A hybrid chosen head by head: the k heads with the largest transfer error stay softmax, the rest are linear.
Perplexity on held-out text and needle recall at 512 tokens against k:"""),
    ("code", """hybrid_curve(summary["hybrid"], title="SmolLM2-135M, Hedgehog heads, k hardest kept softmax")"""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
