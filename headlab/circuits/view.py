"""The explorer's circuit tab, Gradio-free: a discovered circuit (`headlab circuit discover` folder) on its model —
the graph, one head's pattern on one of the task's prompts, and that head patched live from the corrupted prompt.

The folder is chosen when the app is launched (`headlab explore --circuit DIR`), never by a client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from headlab.circuits.circuit import Circuit, load_task
from headlab.edits import Patch, edit
from headlab.errors import HeadlabError
from headlab.heads import HeadRef, as_heads
from headlab.models.head_model import HeadModel


def _tok(text: str) -> str:
    return repr(text).replace("|", "\\|")


@dataclass
class CircuitView:
    """A circuit folder opened on its model (loaded through `load`, e.g. the explorer's model cache)."""

    folder: Path
    circuit: Circuit
    task: Any
    load: Callable[[str], HeadModel]

    @classmethod
    def open(cls, folder: str | Path, load: Callable[[str], HeadModel]) -> "CircuitView":
        folder = Path(folder)
        return cls(folder=folder, circuit=Circuit.load(folder), task=load_task(folder), load=load)

    @property
    def model(self) -> HeadModel:
        return self.load(self.circuit.model)

    def head_choices(self) -> list[str]:
        """The circuit's heads, strongest first."""
        return [str(h.head) for h in sorted(self.circuit.heads, key=lambda h: -abs(h.effect))]

    def summary_md(self) -> str:
        """The circuit as a markdown table (head, role, effect, direct share, attention evidence)."""
        c = self.circuit
        meta = c.meta
        lines = [f"**{c.task}** on `{c.model}`: top {c.fraction:.0%} of heads by |exact patching effect|; clean "
                 f"accuracy {meta.get('accuracy_clean', float('nan')):.3f}, LD {meta.get('ld_clean', float('nan')):.2f}"
                 f" → corrupted {meta.get('ld_corrupt', float('nan')):.2f}", "",
                 "| head | role | effect | direct | prev-token | induction | duplicate |", "|---|---|---|---|---|---|---|"]
        for h in sorted(c.heads, key=lambda h: -abs(h.effect)):
            ev = h.evidence
            lines.append(f"| {h.head} | {h.role} | {h.effect:+.3f} | {ev.get('direct', 0):+.3f} | "
                         f"{ev.get('prev_token', 0):.2f} | {ev.get('induction', 0):.2f} | {ev.get('duplicate', 0):.2f} |")
        return "\n".join(lines)

    def figure(self) -> Any:
        return self.circuit.figure()

    def _head(self, text: str) -> HeadRef:
        try:
            (head,) = as_heads([text.strip()])
        except (ValueError, TypeError):
            raise HeadlabError(f"{text!r} is not a head: write it like L12H3") from None
        self.model.check_heads([head])
        return head

    def _index(self, index: float | int | None) -> int:
        n = len(self.task.clean)
        i = 0 if index is None else int(index)
        if not 0 <= i < n:
            raise HeadlabError(f"prompt {i} is out of range: the task has prompts 0..{n - 1}")
        return i

    def prompt_md(self, index: float | int | None) -> str:
        i = self._index(index)
        model = self.model
        answer = model.token_strings([int(self.task.answer[i])])[0]
        wrong = model.token_strings([int(self.task.wrong[i])])[0]
        return (f"clean: `{self.task.clean[i]!s}`  \ncorrupted: `{self.task.corrupt[i]!s}`  \n"
                f"answer {_tok(answer)} vs wrong {_tok(wrong)}")

    def head_pattern(self, head_text: str, index: float | int | None) -> tuple[str, Any]:
        """(markdown, figure): the head's pattern on clean prompt `index`."""
        head, i = self._head(head_text), self._index(index)
        run = self.model.run([self.task.clean[i]], heads=[head])
        evidence = next((h for h in self.circuit.heads if h.head == head), None)
        role = f"{evidence.role}, effect {evidence.effect:+.3f}" if evidence else "not in the circuit"
        return f"{head}: {role}", run.figure(head, title=f"{head} on prompt {i} — {self.circuit.task}")

    def patch(self, head_text: str, index: float | int | None) -> str:
        """Markdown: the logit difference on clean prompt `index` before / with the head patched from its corrupted
        prompt / on the corrupted prompt, and the top predictions before and after."""
        head, i = self._head(head_text), self._index(index)
        model = self.model
        clean, corrupt = [self.task.clean[i]], [self.task.corrupt[i]]
        tokens = [int(self.task.answer[i]), int(self.task.wrong[i])]
        source = model.run(corrupt, heads=[head], with_z=True)
        with torch.no_grad():
            base = model.forward(clean).logits[0, -1].float()
            with edit(model, Patch(head, z=source.z(head))):
                patched = model.forward(clean).logits[0, -1].float()
            bad = model.forward(corrupt).logits[0, -1].float()

        def ld(logits: torch.Tensor) -> float:
            return float(logits[tokens[0]] - logits[tokens[1]])

        def top(logits: torch.Tensor) -> str:
            probs = torch.softmax(logits, -1)
            values, idx = probs.topk(5)
            return ", ".join(f"{_tok(t)} {p:.2f}" for t, p in zip(model.token_strings(idx.tolist()), values.tolist()))

        return ("| run | logit difference | top-5 next tokens |\n|---|---|---|\n"
                f"| clean | {ld(base):+.3f} | {top(base)} |\n"
                f"| clean, {head} patched from corrupted | {ld(patched):+.3f} | {top(patched)} |\n"
                f"| corrupted | {ld(bad):+.3f} | {top(bad)} |")
