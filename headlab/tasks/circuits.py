"""Circuit-discovery tasks as clean / corrupted prompt pairs, generated offline from the data in data/circuits/.

Each task is a JSON file (templates, word lists, source and notes) and a generator here. `make_task(name, tokenizer,
n, seed=...)` draws n pairs deterministically and checks every one against the tokenizer it is given:

- a prompt is tokenized as `HeadModel.encode` does (`tokenizer(text, add_special_tokens=True)`), and the named
  positions are indices into that token list;
- the answer and the wrong continuation are each one token: the clean prompt's text followed by the answer's text
  tokenizes as the prompt's tokens plus exactly one token (the same for the wrong text);
- the corrupted prompt has as many tokens as the clean one and the same index for every named position; each named
  slot (a name, a colour, a digit) is exactly one token in both.

A pair that fails a check is drawn again (`meta["redrawn"]` counts them). Word lists are first cut to the words that
are one token after a space in this tokenizer (`meta["dropped_words"]` lists the rest).

- ioi: Wang et al.'s 15 templates, ABBA and BABA alternating; answer IO, wrong S; corruption ABC.
- colored_objects: Merullo et al.'s one-shot Colored Objects; answer the queried colour, wrong the colour of the
  object the corrupted question asks about.
- greater_than: Hanna et al.'s years, adapted to a tokenizer that writes each digit as a token (answer = the next
  decade's digit d+1, wrong = d-1; see data/circuits/greater_than.json); corruption XX01.
- gendered_pronoun: "So {name} is a really great friend, isn't" -> " he" / " she" (and three templates like it);
  corruption: a name of the other gender.
- induction: a list of names, then the list again cut short: the next name; corruption: answer and wrong swapped in
  the first list.
- docstring: Heimersheim & Janiak's docstring argument completion; corruption 'random_random'.

The tokenizer must be a fast (Rust) Hugging Face tokenizer: positions come from its character-to-token map.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from headlab.paths import circuits as circuits_dir


@dataclass(frozen=True)
class CircuitBatch:
    """N clean / corrupted prompt pairs of one task, with the tokens the logit difference compares.

    Attributes:
        task: the task's name.
        clean: N clean prompts (text, fed without a chat template; the tokenizer's special tokens as it adds them).
        corrupt: N corrupted prompts, each with as many tokens as its clean prompt.
        answer: `[N]` the right next token id after the clean prompt.
        wrong: `[N]` the token id the logit difference compares with (logit[answer] - logit[wrong]).
        positions: name -> `[N]` token index in each prompt (the same in clean and corrupt); always has "end", the
            last token.
        meta: seed, n, the corruption, per-item draws (`items`), template ids, dropped words (JSON-able).
    """

    task: str
    clean: list[str]
    corrupt: list[str]
    answer: torch.Tensor
    wrong: torch.Tensor
    positions: dict[str, torch.Tensor]
    meta: dict


@dataclass(frozen=True)
class _Piece:
    """A stretch of prompt text; `names` label a slot whose token position is recorded (it must be one token)."""

    text: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Draft:
    """One drawn pair before tokenization."""

    clean: list[_Piece]
    corrupt: list[_Piece]
    answer: str
    wrong: str
    item: dict = field(default_factory=dict)


_SLOT = re.compile(r"\[([A-Z_]+)\]")


def _render(template: str, fills: dict[str, Any]) -> list[_Piece]:
    """Cut a template into pieces; a fill is a text, or a list of (text, names) for the placeholder's occurrences.

    A space before a placeholder goes into the slot's piece (so a slot " Mary" is the token " Mary").
    """
    pieces: list[_Piece] = []
    seen: dict[str, int] = {}
    pos = 0
    for m in _SLOT.finditer(template):
        literal = template[pos:m.start()]
        key = m.group(1)
        fill = fills[key]
        if isinstance(fill, str):
            text, names = fill, ()
        else:
            text, names = fill[seen.get(key, 0)]
            names = (names,) if isinstance(names, str) else tuple(names)
        seen[key] = seen.get(key, 0) + 1
        if names and literal.endswith(" "):
            literal, text = literal[:-1], " " + text
        pieces += [_Piece(literal), _Piece(text, names)]
        pos = m.end()
    pieces.append(_Piece(template[pos:]))
    return [p for p in pieces if p.text or p.names]


def _text(pieces: list[_Piece]) -> str:
    return "".join(p.text for p in pieces)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _slot_positions(tokenizer, pieces: list[_Piece]) -> tuple[list[int], dict[str, int]] | None:
    """The prompt's token ids and each named slot's token index; None when a slot is not exactly one token."""
    text = _text(pieces)
    enc = tokenizer(text, add_special_tokens=True)
    positions: dict[str, int] = {}
    start = 0
    for piece in pieces:
        end = start + len(piece.text)
        if piece.names:
            tok = enc.char_to_token(start)
            if (tok is None or enc.char_to_token(end - 1) != tok
                    or (start > 0 and enc.char_to_token(start - 1) == tok)
                    or (end < len(text) and enc.char_to_token(end) == tok)):
                return None
            positions.update({name: tok for name in piece.names})
        start = end
    ids = list(enc["input_ids"])
    positions["end"] = len(ids) - 1
    return ids, positions


def _next_token(tokenizer, text: str, ids: list[int], continuation: str) -> int | None:
    """The one token that `continuation` adds after `text` (None if it adds more or changes the prompt's tokens)."""
    full = _ids(tokenizer, text + continuation)
    if len(full) != len(ids) + 1 or full[:len(ids)] != ids:
        return None
    return full[-1]


def _single_token_words(tokenizer, words: list[str], *, space: bool = True) -> tuple[list[str], list[str]]:
    """(kept, dropped): the words that are one token (after a space when `space`) in this tokenizer."""
    kept = [w for w in words if len(tokenizer.encode((" " if space else "") + w, add_special_tokens=False)) == 1]
    return kept, [w for w in words if w not in kept]


def _load(name: str) -> dict:
    path = circuits_dir() / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"circuit task data {path} is missing: these tasks read data/circuits/ of a checkout")
    return json.loads(path.read_text())


# Each task cuts its word lists to this tokenizer and returns (draw(rng, i) -> _Draft, meta); i is the pair's index.


def _ioi(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    names, dropped = _single_token_words(tokenizer, data["names"])
    places, objects = data["places"], data["objects"]

    def draw(rng: random.Random, i: int) -> _Draft:
        form = ("ABBA", "BABA")[i % 2]
        tid = rng.randrange(len(data["templates"][form]))
        template = data["templates"][form][tid]
        io, s, a, b, c = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        clean = _render(template, {"IO": [(io, "IO")], "S": [(s, "S1"), (s, "S2")], "PLACE": place, "OBJECT": obj})
        corrupt = _render(template, {"IO": [(a, "IO")], "S": [(b, "S1"), (c, "S2")], "PLACE": place, "OBJECT": obj})
        item = {"template": tid, "form": form, "io": io, "s": s, "abc": [a, b, c], "place": place, "object": obj}
        return _Draft(clean, corrupt, " " + io, " " + s, item)

    return draw, {"dropped_words": dropped, "n_names": len(names)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _colored_objects(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    objects, dropped = _single_token_words(tokenizer, data["objects"])
    colors = data["colors"]
    head, tail = data["template"].split("[ITEMS]")
    head = head.rstrip(" ")

    def example(rng: random.Random) -> tuple[str, str, list[str], list[str], int]:
        return (rng.choice(data["surfaces"]), rng.choice(data["subject_starts"]), rng.sample(colors, 3),
                rng.sample(objects, 3), rng.randrange(3))

    def items_text(cols: list[str], objs: list[str]) -> str:
        items = [f"{_article(c)} {c} {o}" for c, o in zip(cols, objs)]
        return ", ".join(items[:-1]) + ", and " + items[-1]

    def query(surface: str, start: str, cols: list[str], objs: list[str], q: int, asked: str) -> list[_Piece]:
        pieces = [_Piece(head.replace("[SURFACE]", surface).replace("[START]", start))]
        for k, (c, o) in enumerate(zip(cols, objs)):
            sep = "" if k == 0 else ("," if k < 2 else ", and")
            names = (f"c{k + 1}", "answer_color") if k == q else (f"c{k + 1}",)
            pieces += [_Piece(f"{sep} {_article(c)}"), _Piece(" " + c, names), _Piece(" " + o, (f"o{k + 1}",))]
        before, after = tail.split("[QUERY]")
        return pieces + [_Piece(before.rstrip(" ")), _Piece(" " + asked, ("query_obj",)), _Piece(after)]

    def draw(rng: random.Random, i: int) -> _Draft:
        surface, start, shot_cols, shot_objs, shot_q = example(rng)
        shot = (data["template"].replace("[SURFACE]", surface).replace("[START]", start)
                .replace("[ITEMS]", items_text(shot_cols, shot_objs)).replace("[QUERY]", shot_objs[shot_q])
                + f" {shot_cols[shot_q].title()}\n")
        surface, start, cols, objs, q = example(rng)
        other = rng.choice([k for k in range(3) if k != q])
        clean = [_Piece(shot)] + query(surface, start, cols, objs, q, objs[q])
        corrupt = [_Piece(shot)] + query(surface, start, cols, objs, q, objs[other])
        item = {"colors": cols, "objects": objs, "query": q, "corrupt_query": other,
                "shot": {"colors": shot_cols, "objects": shot_objs, "query": shot_q}}
        return _Draft(clean, corrupt, " " + cols[q].title(), " " + cols[other].title(), item)

    return draw, {"dropped_words": dropped, "n_objects": len(objects)}


def _greater_than(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    def year_pieces(century: int, tens: int, units: int) -> list[_Piece]:
        return [_Piece(str(century)), _Piece(str(tens), ("start_tens",)), _Piece(str(units), ("start_units",))]

    def draw(rng: random.Random, i: int) -> _Draft:
        noun, century = rng.choice(data["nouns"]), rng.choice(data["centuries"])
        tens, units = rng.choice(data["tens_digits"]), rng.randrange(10)
        before, rest = data["template"].replace("[NOUN]", noun).split("[XX][YY]")
        after = rest.replace("[XX]", str(century))
        clean = [_Piece(before)] + year_pieces(century, tens, units) + [_Piece(after)]
        corrupt = [_Piece(before)] + year_pieces(century, 0, 1) + [_Piece(after)]
        item = {"noun": noun, "year": century * 100 + tens * 10 + units, "corrupt_year": century * 100 + 1}
        return _Draft(clean, corrupt, str(tens + 1), str(tens - 1), item)

    return draw, {}


def _gendered_pronoun(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    names, dropped = {}, []
    for gender, words in data["names"].items():
        names[gender], out = _single_token_words(tokenizer, words)
        dropped += out
    genders = sorted(names)

    def draw(rng: random.Random, i: int) -> _Draft:
        gender = genders[i % 2]
        other = genders[1 - i % 2]
        tid = rng.randrange(len(data["templates"]))
        name, swap = rng.choice(names[gender]), rng.choice(names[other])
        clean = _render(data["templates"][tid], {"NAME": [(name, "name")]})
        corrupt = _render(data["templates"][tid], {"NAME": [(swap, "name")]})
        item = {"template": tid, "name": name, "gender": gender, "corrupt_name": swap}
        return _Draft(clean, corrupt, " " + data["pronouns"][gender], " " + data["pronouns"][other], item)

    return draw, {"dropped_words": dropped, "n_names": {g: len(v) for g, v in names.items()}}


def _induction(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    names, dropped = _single_token_words(tokenizer, data["names"])
    k, sep = data["list_length"], data["separator"]

    def listing(words: list[str], labels: dict[int, tuple[str, ...]]) -> list[_Piece]:
        pieces: list[_Piece] = []
        for j, word in enumerate(words):
            pieces += ([_Piece(sep)] if j else []) + [_Piece(" " + word, labels.get(j, ()))]
        return pieces

    def draw(rng: random.Random, i: int) -> _Draft:
        words = rng.sample(names, k)
        m = rng.randint(2, k - 2)  # names repeated before the answer; at least one unrepeated name beside the answer
        answer = words[m]
        w = rng.randrange(m + 1, k)
        first, second = data["template"].split("[LIST]")
        middle, last = second.split("[PARTIAL]")
        src = {m - 1: ("src_prev",), m: ("src_answer",), w: ("src_wrong",)}
        swapped = list(words)
        swapped[m], swapped[w] = words[w], words[m]

        def prompt(first_list: list[str]) -> list[_Piece]:
            return ([_Piece(first.rstrip(" "))] + listing(first_list, src) + [_Piece(middle.rstrip(" "))]
                    + listing(words[:m], {m - 1: ("prev",)}) + [_Piece(last)])

        item = {"names": words, "repeated": m, "wrong_index": w}
        return _Draft(prompt(words), prompt(swapped), " " + answer, " " + words[w], item)

    return draw, {"dropped_words": dropped, "n_names": len(names)}


def _docstring(data: dict, tokenizer) -> tuple[Callable[[random.Random, int], _Draft], dict]:
    variables, dropped = _single_token_words(tokenizer, data["variable_names"])
    words = data["description_words"]
    n_pre, n_match, n_suf = data["n_def_prefix_args"], data["n_matching_args"], data["n_def_suffix_args"]

    def prompt(method: str, def_args: list[str], doc_args: list[str], desc: list[str], arg_desc: list[list[str]],
               labels: dict[int, tuple[str, ...]]) -> list[_Piece]:
        pieces = [_Piece(f"\ndef {method}(self")]
        for j, arg in enumerate(def_args):
            pieces += [_Piece(","), _Piece(" " + arg, labels.get(j, ()))]
        pieces.append(_Piece(f'):\n    """{" ".join(desc)}\n'))
        for j, (arg, d) in enumerate(zip(doc_args, arg_desc)):
            pieces += [_Piece("\n    :param"), _Piece(" " + arg, (f"doc{j + 1}",)), _Piece(f": {' '.join(d)}")]
        return pieces + [_Piece("\n    :param")]

    def draw(rng: random.Random, i: int) -> _Draft:
        method, *args = rng.sample(variables, 1 + n_pre + n_match + n_suf + n_match + (n_match - 1))
        prefix, args = args[:n_pre], args[n_pre:]
        matching, args = args[:n_match], args[n_match:]
        suffix, args = args[:n_suf], args[n_suf:]
        rr_def, rr_doc = args[:n_match], args[n_match:]
        desc = rng.sample(words, data["method_description_words"])
        arg_desc = [rng.sample(words, data["argument_description_words"]) for _ in range(n_match - 1)]
        wrong = rng.choice(prefix + suffix)
        def_args = prefix + matching + suffix
        labels = {n_pre + j: (f"def_doc{j + 1}",) for j in range(n_match - 1)}
        labels[n_pre + n_match - 1] = ("def_answer",)
        labels[def_args.index(wrong)] = ("def_wrong",)
        clean = prompt(method, def_args, matching[:-1], desc, arg_desc, labels)
        corrupt = prompt(method, prefix + rr_def + suffix, rr_doc, desc, arg_desc, labels)
        item = {"method": method, "def_args": def_args, "answer": matching[-1], "wrong": wrong,
                "corrupt_def_args": prefix + rr_def + suffix, "corrupt_doc_args": rr_doc}
        return _Draft(clean, corrupt, " " + matching[-1], " " + wrong, item)

    return draw, {"dropped_words": dropped, "n_variables": len(variables)}


_TASKS: dict[str, Callable[[dict, Any], tuple[Callable[[random.Random, int], _Draft], dict]]] = {
    "ioi": _ioi, "colored_objects": _colored_objects, "greater_than": _greater_than,
    "gendered_pronoun": _gendered_pronoun, "induction": _induction, "docstring": _docstring,
}
CIRCUIT_TASKS: tuple[str, ...] = tuple(_TASKS)


def make_task(name: str, tokenizer, n: int, *, seed: int = 0) -> CircuitBatch:
    """Draw n clean / corrupted pairs of a circuit task, checked against `tokenizer` (deterministic given seed).

    Args:
        name: one of CIRCUIT_TASKS.
        tokenizer: a fast Hugging Face tokenizer (the model's: `model.tokenizer`).
        n: the number of pairs (>= 1).
        seed: the draw's seed; each task has its own generator, `random.Random(f"circuits/{name}/{seed}")`.

    Returns:
        A CircuitBatch of n pairs.

    Raises:
        ValueError: an unknown task, n < 1, a tokenizer that is not fast, or one under which too few drawn pairs pass
            the checks (the message counts why they failed).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown circuit task {name!r}: choose from {', '.join(CIRCUIT_TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("make_task needs a fast (Rust) Hugging Face tokenizer: positions come from its char_to_token")
    data = _load(name)
    draw, task_meta = _TASKS[name](data, tokenizer)
    rng = random.Random(f"circuits/{name}/{seed}")
    rows: list[tuple[str, str, int, int, dict[str, int], dict]] = []
    failures: dict[str, int] = {}
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 20 * n + 200:
            raise ValueError(f"{name}: only {len(rows)} of {n} pairs passed the tokenizer checks in {attempts - 1} "
                             f"draws (failures: {failures}); this tokenizer does not fit the task's word lists")
        d = draw(rng, len(rows))
        reason = _check(tokenizer, d)
        if isinstance(reason, str):
            failures[reason] = failures.get(reason, 0) + 1
            continue
        rows.append((_text(d.clean), _text(d.corrupt), *reason, d.item))
    names = list(rows[0][4])
    meta = {"task": name, "seed": seed, "n": n, "source": data["source"], "corruption": data["corruption"],
            "redrawn": attempts - n, "failures": failures, **task_meta, "items": [r[5] for r in rows]}
    if any("template" in r[5] for r in rows):
        meta["template_ids"] = [r[5].get("template") for r in rows]
    return CircuitBatch(
        task=name, clean=[r[0] for r in rows], corrupt=[r[1] for r in rows],
        answer=torch.tensor([r[2] for r in rows], dtype=torch.long),
        wrong=torch.tensor([r[3] for r in rows], dtype=torch.long),
        positions={k: torch.tensor([r[4][k] for r in rows], dtype=torch.long) for k in names},
        meta=meta)


def _check(tokenizer, d: _Draft) -> tuple[int, int, dict[str, int]] | str:
    """(answer id, wrong id, positions) of a drawn pair, or why it fails the checks."""
    clean = _slot_positions(tokenizer, d.clean)
    corrupt = _slot_positions(tokenizer, d.corrupt)
    if clean is None or corrupt is None:
        return "a named slot is not one token"
    (ids, positions), (corrupt_ids, corrupt_positions) = clean, corrupt
    if len(ids) != len(corrupt_ids) or positions != corrupt_positions:
        return "clean and corrupt differ in length or positions"
    text = _text(d.clean)
    answer, wrong = _next_token(tokenizer, text, ids, d.answer), _next_token(tokenizer, text, ids, d.wrong)
    if answer is None or wrong is None:
        return "the answer or wrong text is not one token after the prompt"
    if answer == wrong:
        return "answer and wrong are the same token"
    return answer, wrong, positions
