"""Offline multiple-choice tasks built from the word lists under data/tasks/, with fixed seeds and disjoint splits.

Each task draws its demonstrations, its calibration items and its evaluation items from three disjoint pools of
words (a word that appears in a calibration item never appears in an evaluation item, as a question or as a
demonstration). Answers are single tokens after a leading space in SmolLM2's tokenizer, so an item is scored by
one forward of its prompt: the log-probability of each option's first token at the last position.

- categories: few-shot word classification into animal / color / fruit / country / sport (chance 20%).
- sentiment: few-shot sentiment of templated one-sentence reviews, positive / negative (chance 50%).
- antonyms: few-shot cloze "The opposite of X is" (chance 25%); the options are the antonym, X itself (a copying
  lure) and 2 other words of the same pool.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from headlab.paths import TASKS_DIR

DATA = TASKS_DIR


@dataclass(frozen=True)
class ChoiceItem:
    """One question: the prompt, the answer options (each scored as `" " + option` after it), the right option.

    Attributes:
        task: the task's name.
        prompt: the prompt text (with its demonstrations).
        options: the answer options.
        answer: the index of the right option.
    """

    task: str
    prompt: str
    options: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class TaskSplits:
    """The calibration and evaluation items of one task (built from disjoint word pools).

    Attributes:
        name: the task's name.
        calibration: the calibration items.
        evaluation: the evaluation items.
    """

    name: str
    calibration: list[ChoiceItem]
    evaluation: list[ChoiceItem]


def _load(name: str) -> dict:
    path = DATA / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"task data {path} is missing: headlab's tasks read data/tasks/ of a checkout")
    return json.loads(path.read_text())


def _thirds(words: list[str], rng: random.Random, n_demo: int, n_calib: int) -> tuple[list[str], list[str], list[str]]:
    """Shuffle and cut a word list into (demonstration, calibration, evaluation) pools."""
    words = list(words)
    rng.shuffle(words)
    return words[:n_demo], words[n_demo:n_demo + n_calib], words[n_demo + n_calib:]


def _sample(pool: list, n: int, rng: random.Random) -> list:
    return rng.sample(pool, min(n, len(pool)))


def categories(*, n_calib: int, n_eval: int, shots: int = 5, seed: int = 0) -> TaskSplits:
    """Few-shot word classification into five categories."""
    data = _load("categories")
    labels: list[str] = data["labels"]
    rng = random.Random(f"categories/{seed}")
    pools = {lab: _thirds(data["words"][lab], rng, 8, 8) for lab in labels}
    demos = [(w, lab) for lab in labels for w in pools[lab][0]]
    head = f"Classify each word as {', '.join(labels[:-1])} or {labels[-1]}.\n\n"

    def item(word: str, label: str) -> ChoiceItem:
        shown = rng.sample(demos, shots)
        text = head + "".join(f"Word: {w}\nCategory: {lab}\n\n" for w, lab in shown) + f"Word: {word}\nCategory:"
        return ChoiceItem("categories", text, tuple(labels), labels.index(label))

    calib = _sample([(w, lab) for lab in labels for w in pools[lab][1]], n_calib, rng)
    evals = _sample([(w, lab) for lab in labels for w in pools[lab][2]], n_eval, rng)
    return TaskSplits("categories", [item(*x) for x in calib], [item(*x) for x in evals])


def sentiment(*, n_calib: int, n_eval: int, shots: int = 4, seed: int = 0) -> TaskSplits:
    """Few-shot sentiment of templated reviews (adjectives split into disjoint pools; templates shared)."""
    data = _load("sentiment")
    labels: list[str] = data["labels"]
    templates: list[str] = data["templates"]
    rng = random.Random(f"sentiment/{seed}")
    pools = {lab: _thirds(data["words"][lab], rng, 8, 8) for lab in labels}
    head = "Is each review positive or negative?\n\n"

    def item(adj: str, template: str, label: str) -> ChoiceItem:
        shown = [(rng.choice(pools[lab][0]), rng.choice(templates), lab) for lab in labels for _ in range(shots // 2)]
        rng.shuffle(shown)
        body = "".join(f"Review: {t.format(a)}\nSentiment: {lab}\n\n" for a, t, lab in shown)
        return ChoiceItem("sentiment", head + body + f"Review: {template.format(adj)}\nSentiment:", tuple(labels),
                          labels.index(label))

    def split(k: int, n: int) -> list[ChoiceItem]:
        pairs = [(a, t, lab) for lab in labels for a in pools[lab][k] for t in templates]
        return [item(*x) for x in _sample(pairs, n, rng)]

    return TaskSplits("sentiment", split(1, n_calib), split(2, n_eval))


def antonyms(*, n_calib: int, n_eval: int, shots: int = 4, seed: int = 0) -> TaskSplits:
    """Few-shot antonym cloze, both directions of each pair; options: the antonym, the word itself, 2 other words."""
    pairs = [tuple(p) for p in _load("antonyms")["pairs"]]
    rng = random.Random(f"antonyms/{seed}")
    demo, calib, evals = _thirds(pairs, rng, 15, 25)

    def item(word: str, answer: str, pool: list[tuple[str, str]]) -> ChoiceItem:
        shown = rng.sample(demo, shots)
        text = "".join(f"The opposite of {a} is {b}.\n" for a, b in shown) + f"The opposite of {word} is"
        others = [w for p in pool for w in p if w not in (word, answer)]
        options = [answer, word] + rng.sample(others, 2)
        rng.shuffle(options)
        return ChoiceItem("antonyms", text, tuple(options), options.index(answer))

    def split(pool: list[tuple[str, str]], n: int) -> list[ChoiceItem]:
        both = [(a, b) for a, b in pool] + [(b, a) for a, b in pool]
        return [item(a, b, pool) for a, b in _sample(both, n, rng)]

    return TaskSplits("antonyms", split(calib, n_calib), split(evals, n_eval))


TASKS: dict[str, Callable[..., TaskSplits]] = {"categories": categories, "sentiment": sentiment, "antonyms": antonyms}


def build_tasks(names: tuple[str, ...] | list[str], *, n_calib: int, n_eval: int, seed: int = 0) -> list[TaskSplits]:
    """The named tasks' splits (each task with its own seeded generator, so adding a task changes no other).

    Args:
        names: task names (keys of `TASKS`: categories, sentiment, antonyms, ...).
        n_calib: calibration items per task (capped by the word pools).
        n_eval: evaluation items per task (capped likewise).
        seed: the builders' seed.

    Returns:
        One TaskSplits per name, in order.

    Raises:
        KeyError: an unknown task.
    """
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}: choose from {sorted(TASKS)}")
    return [TASKS[n](n_calib=n_calib, n_eval=n_eval, seed=seed) for n in names]
