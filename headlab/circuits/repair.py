"""Merullo et al.'s repair, transplanted: heads one task's circuit names (IOI's inhibition / negative movers) made to
attend, at the last position, uniformly over another task's wrong-answer tokens (Colored Objects' other colours).

Accuracy before and after, with Wilson intervals and a paired bootstrap interval of the change, against a control:
the same number of random heads from the same layers, edited the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from headlab.edits import Attend, edit
from headlab.errors import HeadlabError
from headlab.heads import HeadRef, as_heads
from headlab.models.head_model import HeadModel
from headlab.results import read_json, write_json
from headlab.tasks.scoring import paired_bootstrap, wilson

REPAIR_FILE = "repair.json"


@dataclass
class RepairResult:
    """Accuracies before / after the repair and after the control edit."""

    task: str
    model: str
    heads: list[str]
    control_heads: list[str]
    n: int
    accuracy: dict[str, dict[str, Any]]
    delta: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def save(self, folder: str | Path) -> Path:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / REPAIR_FILE, self.to_json())
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> "RepairResult":
        return cls(**read_json(Path(folder) / REPAIR_FILE))


def _correct(model: HeadModel, batch, end: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor,
             edits: list) -> dict[str, torch.Tensor]:
    with torch.no_grad(), edit(model, edits):
        logits = model.forward(batch).logits[torch.arange(len(end)), end].float()
    return {"vs_wrong": logits.gather(1, answer[:, None])[:, 0] > logits.gather(1, wrong[:, None])[:, 0],
            "top1": logits.argmax(-1) == answer}


def repair(model: HeadModel, task: Any, heads: Iterable[Any], *, wrong_positions: Iterable[str],
           answer_position: str | None = None, seed: int = 0) -> RepairResult:
    """Edit `heads` to attend uniformly, at each prompt's last position, over the tokens at `wrong_positions` (minus
    the prompt's `answer_position`, when given), and measure accuracy (answer over the wrong token; answer as the
    top-1 token) before / after, with a random-head control.

    Args:
        model: the model.
        task: a CircuitBatch (clean prompts are scored).
        heads: the heads to edit.
        wrong_positions: names in `task.positions` holding candidate wrong answers (e.g. "c1", "c2", "c3").
        answer_position: the name of the position holding the right answer, excluded from the keys.
        seed: the control's seed.
    """
    heads = as_heads(list(heads))
    if not heads:
        raise HeadlabError("repair needs at least one head to edit")
    model.check_heads(heads)
    names = list(wrong_positions)
    missing = [p for p in names + ([answer_position] if answer_position else []) if p not in task.positions]
    if missing:
        raise HeadlabError(f"task {task.task!r} has no positions {missing}; it has {sorted(task.positions)}")
    batch = model.encode(list(task.clean))
    n, length = batch.input_ids.shape
    end = torch.as_tensor(task.positions["end"]).long()
    keys = torch.zeros(n, length, dtype=torch.bool)
    rows = torch.arange(n)
    for name in names:
        keys[rows, torch.as_tensor(task.positions[name]).long()] = True
    if answer_position:
        keys[rows, torch.as_tensor(task.positions[answer_position]).long()] = False
    queries = torch.zeros(n, length, dtype=torch.bool)
    queries[rows, end] = True
    gen = torch.Generator().manual_seed(seed)
    chosen = set(heads)
    control = []
    for h in heads:  # a random other head of the same layer
        others = [HeadRef(h.layer, j) for j in range(model.n_heads) if HeadRef(h.layer, j) not in chosen | set(control)]
        control.append(others[int(torch.randint(len(others), (1,), generator=gen))] if others else h)
    start = time.perf_counter()
    answer, wrong = torch.as_tensor(task.answer).long(), torch.as_tensor(task.wrong).long()
    results = {
        "before": _correct(model, batch, end, answer, wrong, []),
        "after": _correct(model, batch, end, answer, wrong, [Attend(h, keys=keys, queries=queries) for h in heads]),
        "control": _correct(model, batch, end, answer, wrong, [Attend(h, keys=keys, queries=queries) for h in control]),
    }
    accuracy = {cond: {metric: {"accuracy": float(v.float().mean()), "ci95": list(wilson(int(v.sum()), n))}
                       for metric, v in res.items()} for cond, res in results.items()}
    delta: dict[str, dict[str, Any]] = {}
    for cond in ("after", "control"):
        delta[cond] = {}
        for metric in ("vs_wrong", "top1"):
            before, now = results["before"][metric], results[cond][metric]
            delta[cond][metric] = {"change": float(now.float().mean() - before.float().mean()),
                                   "ci95": list(paired_bootstrap(before, now, seed=seed))}
    return RepairResult(task=task.task, model=model.name, heads=[str(h) for h in heads],
                        control_heads=[str(h) for h in control], n=n, accuracy=accuracy, delta=delta,
                        meta={"wrong_positions": names, "answer_position": answer_position, "seed": seed,
                              "seconds": round(time.perf_counter() - start, 2)})
