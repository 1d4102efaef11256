"""Writes notebooks/circuit_reuse.ipynb (no outputs): `python notebooks/make_circuit_reuse.py`."""

from __future__ import annotations

from pathlib import Path

from nbwrite import write_notebook

NOTEBOOK = "circuit_reuse.ipynb"
ID_PREFIX = "circuits"

CELLS = [
    ("md", """# Circuits across tasks: patching, attribution that misses, and reuse

A task is a set of clean / corrupted prompt pairs and a metric, the logit difference (LD) of the right answer over a
wrong one at the last position. A head's **effect** is how far patching its output from the corrupted run into the
clean run moves LD toward its corrupted value (0: nothing, 1: all the way). **Path patching** asks the same of one
edge: the sender's corrupted output reaching only one receiver's query, key or value. A **circuit** is the top few
percent of heads by |effect|, each with a role from headlab's own measurements, and the edges between them.

This notebook runs everything on a **planted** model whose wiring is known by construction (two layers, a
previous-token head feeding an induction head through its keys, two distractor heads), so each tool can be checked
against the truth in seconds. The same functions run on SmolLM2 from the command line:

```
headlab circuit discover --task ioi --out runs/ioi --atp
headlab circuit discover --task induction --out runs/induction
headlab circuit compare runs/ioi runs/induction --out runs/reuse
headlab circuit repair --circuit runs/ioi --task colored_objects --out runs/repair
```"""),
    ("code", """import tempfile
import dataclasses

import torch

import headlab as hl
from headlab.circuits import (agreement, atp, atp_star, compare, discover, exact_patching, path_patching, prepare,
                              DiscoverParams)
from headlab.circuits.composition import composition_scores, precision_at_k, talking_heads
from headlab.circuits.planted import planted_induction_model, planted_induction_task

torch.set_num_threads(1)
model = planted_induction_model()
task = planted_induction_task(32)
print(model)
print("clean:", task.clean[0], "→ answer", int(task.answer[0]), "| corrupted:", task.corrupt[0])"""),
    ("md", """## 1. Exact patching

`prepare` runs the clean and corrupted prompts once; `exact_patching` patches each head alone
(`hl.Patch(head, z=corrupted output)` inside `hl.edit`), rerunning only the layers from the head's on, with the
heads of a layer side by side as copies of the batch."""),
    ("code", """prep = prepare(model, task)
print(f"LD clean {prep.ld_clean.mean():.2f}, corrupted {prep.ld_corrupt.mean():.2f}")
exact = exact_patching(model, prep, progress=False)
exact.maps["effect"]"""),
    ("md", """## 2. Path patching finds the edge

Every sender in layer 0 against every receiver in layer 1, per channel: only L0H0 → L1H0 through the key carries
the effect."""),
    ("code", """edges = path_patching(model, prep, model.heads([0]), model.heads([1]), progress=False)
for e in sorted(edges, key=lambda e: -abs(e.effect)):
    print(f"{e.sender} → {e.receiver} ({e.channel}): {e.effect:+.3f}")"""),
    ("md", """## 3. Attribution patching gets the previous-token head wrong

AtP estimates every effect from one forward and one backward: Σ (z_corrupt − z_clean) · ∂LD/∂z, with the gradient
taken through every path (a zero added to each head's output, `hl.edits.Add`, so downstream heads keep their graph).
The induction head's softmax is saturated (it puts ~all its weight on one key): linearising through it gives the
previous-token head an estimate of the **wrong sign**, while exact patching gives it the full effect — the failure
the pruning issue saw on SmolLM2's previous-token head. AtP*'s correction recomputes the softmax exactly for a head's
*own* query and key terms; the saturation here is one layer downstream, so it does not fix the sign. Its GradDrop
magnitude does flag the head, so the screen `max(|AtP*|, GradDrop)` keeps it among the heads to verify exactly —
and `headlab circuit discover` decides with exact patching."""),
    ("code", """plain, star = atp(model, prep), atp_star(model, prep, progress=False)
print("exact ", [round(v, 3) for v in exact.maps["effect"].flatten().tolist()])
print("AtP   ", [round(v, 3) for v in plain.maps["effect"].flatten().tolist()])
print("AtP*  ", [round(v, 3) for v in star.maps["effect"].flatten().tolist()])
print("screen", [round(v, 3) for v in star.maps["screen"].flatten().tolist()])
agreement(exact, star, k=2, map="screen")"""),
    ("md", """## 4. Weights predict wiring

Composition scores (Elhage et al.) from the weights alone: the K-composition of L0H0's OV into L1H0's QK ranks
first. The Talking-Heads decomposition splits it over the rank-1 components of the sender's OV: here the OV copies
ten tokens with equal weight (ten equal singular values), so the signal is spread evenly over ten components — a
full-rank channel by construction, unlike the one or two components the paper finds in trained models."""),
    ("code", """comp = composition_scores(model, progress=False)
print(comp.top_edges(3))
truth = {(e.sender, e.receiver, e.channel) for e in edges if abs(e.effect) > 0.05}
print("precision@1 against path patching:", precision_at_k(comp, truth, 1))
talking_heads(model, hl.HeadRef(0, 0), hl.HeadRef(1, 0), "k")[:4]"""),
    ("md", """## 5. A circuit as a result, and reuse between tasks

`discover` writes a resumable folder (exact patching line by line, roles, edges, `circuit.json`); `compare` measures
how much two tasks' circuits overlap against random head sets and against random sets with the same per-layer
profile. Here the second task is the same behaviour on other prompts, so the circuits coincide."""),
    ("code", """out = tempfile.mkdtemp(prefix="circuits-")
params = DiscoverParams(n=16, fraction=0.5, edge_prompts=16)
one = discover(model, task, params=params, out=f"{out}/copy-a", progress=False)
other = dataclasses.replace(planted_induction_task(16, seed=1), task="planted_copy_b")
two = discover(model, other, params=params, out=f"{out}/copy-b", progress=False)
print({str(h.head): h.role for h in one.heads})
comparison = compare([f"{out}/copy-a", f"{out}/copy-b"], fractions=(0.5,), draws=1000)
comparison.table(0.5)"""),
    ("code", """one.figure()"""),
]


def main() -> None:
    write_notebook(CELLS, Path(__file__).resolve().parent / NOTEBOOK, id_prefix=ID_PREFIX)


if __name__ == "__main__":
    main()
