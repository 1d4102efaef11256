"""Circuit-discovery tasks (headlab.tasks.circuits): pairs of equal length, one-token answers, positions on the named
tokens, determinism and bad arguments. No model forward.

Two tokenizers: a byte-level word-level tokenizer built in the test from the data's own words (fast, digits one token
each like SmolLM2's), and SmolLM2's own, read from its built folder (slow: the first use builds it from the GGUF).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from headlab.paths import ROOT, circuits
from headlab.tasks.circuits import CIRCUIT_TASKS, CircuitBatch, make_task

N = 40


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _wordlevel() -> transformers.PreTrainedTokenizerFast:
    """Every word of data/circuits (and its title case) as a token, with and without a leading space; digits split."""
    words = {w for f in circuits().glob("*.json") for s in _strings(json.loads(f.read_text()))
             for w in re.findall(r"[A-Za-z]+", s)}
    words |= {w.title() for w in words} | set("0123456789")
    vocab = {"[UNK]": 0}
    for w in sorted(words):
        for form in (w, "Ġ" + w):
            vocab.setdefault(form, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module", params=["wordlevel", pytest.param("smollm2", marks=pytest.mark.slow)])
def tokenizer(request):
    if request.param == "wordlevel":
        return _wordlevel()
    from headlab.models.smollm2 import smollm2_folder
    return transformers.AutoTokenizer.from_pretrained(smollm2_folder(progress=False))


def _word(tokenizer, ids: list[int], pos: int) -> str:
    return tokenizer.decode([ids[pos]])


def test_the_data_folder_holds_every_task():
    assert circuits() == ROOT / "data" / "circuits"
    for name in CIRCUIT_TASKS:
        data = json.loads((circuits() / f"{name}.json").read_text())
        assert data["task"] == name and data["source"] and data["notes"] and data["corruption"]


def test_ioi_has_wang_et_al_15_templates_in_both_orders():
    data = json.loads((circuits() / "ioi.json").read_text())
    baba, abba = data["templates"]["BABA"], data["templates"]["ABBA"]
    assert len(baba) == len(abba) == 15
    for b, a in zip(baba, abba):
        assert b.count("[S]") == 2 and b.count("[IO]") == 1
        assert b.index("[S]") < b.index("[IO]") and a.index("[IO]") < a.index("[S]")
        assert a.replace("[IO] and [S]", "[S] and [IO]", 1) == b


@pytest.mark.parametrize("name", ["nope", "IOI", ""])
def test_an_unknown_task_is_refused_naming_the_valid_ones(name):
    with pytest.raises(ValueError, match="ioi.*colored_objects"):
        make_task(name, None, 5)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10"], ids=["zero", "negative", "float", "bool", "str"])
def test_a_bad_n_is_refused(n):
    with pytest.raises(ValueError, match="n must be a positive"):
        make_task("ioi", None, n)


def test_a_slow_tokenizer_is_refused():
    with pytest.raises(ValueError, match="fast"):
        make_task("ioi", object(), 3)


@pytest.mark.parametrize("name", CIRCUIT_TASKS)
def test_pairs_have_equal_lengths_and_one_token_answers(tokenizer, name):
    batch = make_task(name, tokenizer, N, seed=1)
    assert isinstance(batch, CircuitBatch) and batch.task == name
    assert len(batch.clean) == len(batch.corrupt) == N
    assert batch.answer.shape == batch.wrong.shape == (N,) and batch.answer.dtype == batch.wrong.dtype == torch.long
    assert (batch.answer != batch.wrong).all()
    assert "end" in batch.positions
    for key, pos in batch.positions.items():
        assert pos.shape == (N,) and pos.dtype == torch.long, key
    for i, (clean, corrupt) in enumerate(zip(batch.clean, batch.corrupt)):
        ids = tokenizer(clean)["input_ids"]
        assert len(tokenizer(corrupt)["input_ids"]) == len(ids)
        assert batch.positions["end"][i] == len(ids) - 1
        for tok in (batch.answer[i], batch.wrong[i]):
            assert tokenizer(clean + tokenizer.decode([tok]))["input_ids"] == ids + [int(tok)]
    json.dumps(batch.meta)  # JSON-able
    assert batch.meta["seed"] == 1 and batch.meta["n"] == N


def _words_at(tokenizer, batch: CircuitBatch, i: int) -> tuple[dict[str, str], dict[str, str]]:
    clean, corrupt = tokenizer(batch.clean[i])["input_ids"], tokenizer(batch.corrupt[i])["input_ids"]
    return ({k: _word(tokenizer, clean, int(v[i])) for k, v in batch.positions.items()},
            {k: _word(tokenizer, corrupt, int(v[i])) for k, v in batch.positions.items()})


def test_ioi_positions_point_at_the_names(tokenizer):
    batch = make_task("ioi", tokenizer, N)
    assert {it["form"] for it in batch.meta["items"]} == {"ABBA", "BABA"}
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        assert (clean["IO"], clean["S1"], clean["S2"]) == (" " + it["io"], " " + it["s"], " " + it["s"])
        assert [corrupt["IO"], corrupt["S1"], corrupt["S2"]] == [" " + w for w in it["abc"]]
        assert not {it["io"], it["s"]} & set(it["abc"]) and len(set(it["abc"])) == 3
        assert tokenizer.decode([batch.answer[i]]) == " " + it["io"]
        assert tokenizer.decode([batch.wrong[i]]) == " " + it["s"]
        assert (batch.positions["IO"][i] < batch.positions["S1"][i]) == (it["form"] == "ABBA")
        assert batch.positions["S2"][i] > max(batch.positions["IO"][i], batch.positions["S1"][i])


def test_colored_objects_positions_point_at_the_colours(tokenizer):
    batch = make_task("colored_objects", tokenizer, N)
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        q, other = it["query"], it["corrupt_query"]
        assert [clean[f"c{k}"] for k in (1, 2, 3)] == [" " + c for c in it["colors"]]
        assert [clean[f"o{k}"] for k in (1, 2, 3)] == [" " + o for o in it["objects"]]
        assert batch.positions["answer_color"][i] == batch.positions[f"c{q + 1}"][i]
        assert clean["query_obj"] == " " + it["objects"][q] and corrupt["query_obj"] == " " + it["objects"][other]
        assert tokenizer.decode([batch.answer[i]]) == " " + it["colors"][q].title()
        assert tokenizer.decode([batch.wrong[i]]) == " " + it["colors"][other].title()
        assert batch.clean[i].count("\nA:") == 2  # one solved shot, then the query


def test_greater_than_positions_point_at_the_start_decade(tokenizer):
    batch = make_task("greater_than", tokenizer, N)
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        tens, units = it["year"] // 10 % 10, it["year"] % 10
        assert (clean["start_tens"], clean["start_units"]) == (str(tens), str(units))
        assert (corrupt["start_tens"], corrupt["start_units"]) == ("0", "1")
        assert batch.clean[i].endswith(f"to the year {it['year'] // 100}")
        assert tokenizer.decode([batch.answer[i]]) == str(tens + 1)
        assert tokenizer.decode([batch.wrong[i]]) == str(tens - 1)


def test_gendered_pronoun_swaps_the_gender(tokenizer):
    batch = make_task("gendered_pronoun", tokenizer, N)
    data = json.loads((circuits() / "gendered_pronoun.json").read_text())
    assert {it["gender"] for it in batch.meta["items"]} == {"male", "female"}
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        assert clean["name"] == " " + it["name"] and corrupt["name"] == " " + it["corrupt_name"]
        other = "female" if it["gender"] == "male" else "male"
        assert it["name"] in data["names"][it["gender"]] and it["corrupt_name"] in data["names"][other]
        assert tokenizer.decode([batch.answer[i]]) == " " + data["pronouns"][it["gender"]]
        assert tokenizer.decode([batch.wrong[i]]) == " " + data["pronouns"][other]


def test_induction_positions_point_at_the_copied_names(tokenizer):
    batch = make_task("induction", tokenizer, N)
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        names, m, w = it["names"], it["repeated"], it["wrong_index"]
        assert clean["src_prev"] == clean["prev"] == " " + names[m - 1]
        assert (clean["src_answer"], clean["src_wrong"]) == (" " + names[m], " " + names[w])
        assert (corrupt["src_answer"], corrupt["src_wrong"]) == (" " + names[w], " " + names[m])
        assert batch.positions["prev"][i] == batch.positions["end"][i] - 1
        assert tokenizer.decode([batch.answer[i]]) == " " + names[m]
        assert tokenizer.decode([batch.wrong[i]]) == " " + names[w]


def test_docstring_positions_point_at_the_arguments(tokenizer):
    batch = make_task("docstring", tokenizer, N)
    for i, it in enumerate(batch.meta["items"]):
        clean, corrupt = _words_at(tokenizer, batch, i)
        args = it["def_args"]
        assert clean["def_answer"] == " " + it["answer"] == " " + args[4]
        assert clean["doc1"] == clean["def_doc1"] == " " + args[2]
        assert clean["doc2"] == clean["def_doc2"] == " " + args[3]
        assert clean["def_wrong"] == corrupt["def_wrong"] == " " + it["wrong"]
        assert [corrupt["doc1"], corrupt["doc2"]] == [" " + a for a in it["corrupt_doc_args"]]
        assert it["answer"] not in it["corrupt_def_args"] + it["corrupt_doc_args"]
        assert corrupt["def_answer"] == " " + it["corrupt_def_args"][4]
        assert tokenizer.decode([batch.answer[i]]) == " " + it["answer"]


@pytest.mark.parametrize("name", CIRCUIT_TASKS)
def test_a_seed_draws_the_same_pairs_and_another_seed_others(tokenizer, name):
    a, b = make_task(name, tokenizer, 12, seed=3), make_task(name, tokenizer, 12, seed=3)
    assert a.clean == b.clean and a.corrupt == b.corrupt and a.meta == b.meta
    assert torch.equal(a.answer, b.answer) and torch.equal(a.wrong, b.wrong)
    assert all(torch.equal(a.positions[k], b.positions[k]) for k in a.positions)
    assert make_task(name, tokenizer, 12, seed=4).clean != a.clean
    assert make_task(name, tokenizer, 1, seed=3).clean == a.clean[:1]
