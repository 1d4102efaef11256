"""Every entry point meets bad input with a named headlab error or a one-line usage message (issue 16's table).

API rows assert the headlab error type and a phrase naming the problem; CLI rows run `headlab ...` in-process and
assert exit status 2 and a message on stderr (argparse usage errors or `headlab: error:`), never a traceback and
never exit 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import headlab as hl
from headlab.cli import main
from headlab.paths import TOY_INDUCTION_DIR


@pytest.fixture(scope="module")
def toy():
    return hl.load("toy-induction", device="cpu")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Folders of toy-induction with one weight missing, a corrupt config, and a torn checkpoint."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("missing", "config", "torn"):
        shutil.copytree(TOY_INDUCTION_DIR, root / name)
        out[name] = root / name
    sd = load_file(str(out["missing"] / "model.safetensors"))
    sd.pop("transformer.h.1.attn.c_attn.weight")
    save_file(sd, str(out["missing"] / "model.safetensors"), metadata={"format": "pt"})
    (out["config"] / "config.json").write_text("{not json")
    (out["torn"] / "model.safetensors").write_bytes(b"\x00" * 7)
    return out


def _ids(toy, n=12, seed=0):
    return torch.randint(1, toy.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


API = [
    ("unknown model", lambda toy, b: hl.load("no-such-model"), hl.ModelNotFoundError, "unknown model"),
    ("bad device", lambda toy, b: hl.load("toy-induction", device="bogus"), hl.HeadlabError, "not a device"),
    ("missing weight", lambda toy, b: hl.load(b["missing"], device="cpu"), hl.WeightsError, "c_attn.weight"),
    ("corrupt config", lambda toy, b: hl.load(b["config"], device="cpu"), hl.ModelNotFoundError, "not valid JSON"),
    ("torn checkpoint", lambda toy, b: hl.load(b["torn"], device="cpu"), hl.ModelNotFoundError, "could not be loaded"),
    ("empty prompt", lambda toy, b: toy.run([]), hl.PromptError, "empty"),
    ("too long", lambda toy, b: toy.run(list(range(1, 100)) * 3), hl.PromptError, "context"),
    ("layer out of range", lambda toy, b: toy.run([1, 2], layers=[7]), hl.HeadIndexError, "out of range"),
    ("head out of range", lambda toy, b: toy.run([1, 2], heads=[hl.HeadRef(0, 9)]), hl.HeadIndexError, "out of range"),
    ("float ids", lambda toy, b: toy.run(hl.Batch(torch.ones(1, 3), torch.ones(1, 3))), hl.PromptError, "integers"),
    ("mask not 0/1", lambda toy, b: toy.run(hl.Batch(torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), 2))),
     hl.PromptError, "0/1"),
    ("mask with holes", lambda toy, b: toy.run(hl.Batch(torch.ones(1, 4, dtype=torch.long),
                                                        torch.tensor([[1, 0, 1, 1]]))), hl.PromptError, "holes"),
    ("shape mismatch", lambda toy, b: toy.run(hl.Batch(torch.ones(1, 4, dtype=torch.long),
                                                       torch.ones(1, 3, dtype=torch.long))), hl.PromptError, "shape"),
    ("id out of vocab", lambda toy, b: toy.run([1, 500]), hl.PromptError, "0..127"),
    ("Scale NaN", lambda toy, b: hl.Scale(hl.HeadRef(0, 0), factor=float("nan")), hl.EditError, "finite"),
    ("Scale huge is finite but inf", lambda toy, b: hl.Scale(hl.HeadRef(0, 0), factor=float("inf")), hl.EditError,
     "finite"),
    ("Ablate bad head", lambda toy, b: hl.Ablate("L0X1"), hl.EditError, "L<layer>H<head>"),
    ("edit None", lambda toy, b: hl.edit(toy, None).__enter__(), hl.EditError, "list of edits"),
    ("edit head out of range", lambda toy, b: hl.edit(toy, hl.Ablate((5, 0))).__enter__(), hl.HeadIndexError,
     "out of range"),
    ("mean ablation without reference", lambda toy, b: hl.Ablate((0, 0), how="mean"), hl.EditError, "reference"),
]


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_inputs_get_named_errors(toy, broken, case):
    _, call, error, phrase = case
    with pytest.raises(error, match=phrase):
        call(toy, broken)


def test_left_padding_is_moved_right_and_gives_the_unpadded_patterns(toy):
    """An HF tokenizer with padding_side="left" produces such batches: headlab must not compute on shifted positions."""
    a, b = _ids(toy, 12, 0), _ids(toy, 8, 1)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1
    ids[1, :4] = 999  # an out-of-vocab id in padded slots is replaced, not embedded
    head = hl.HeadRef(0, 2)
    left = toy.run(hl.Batch(ids, mask), heads=[head])
    alone = toy.run([b.tolist()], heads=[head])
    assert torch.allclose(left.pattern(head)[1, :8, :8], alone.pattern(head)[0], atol=1e-6)
    assert left.tokens(1) == alone.tokens(0)
    as_mapping = toy.run({"input_ids": ids, "attention_mask": mask}, heads=[head])
    assert torch.equal(as_mapping.pattern(head), left.pattern(head))


CLI = [
    ["prune", "--ctx", "0", "--rank-by", "random", "--eval", "task:induction", "--out", "{tmp}/p"],
    ["prune", "--model", "toy-induction", "--rank-by", "random", "--eval", "task:induction", "--save-model",
     "random:abc", "--out", "{tmp}/p2"],
    ["prune", "--model", "toy-induction", "--rank-by", "nope", "--eval", "task:induction", "--out", "{tmp}/p3"],
    ["scan", "induction", "--top", "-3", "--out", "{tmp}/s"],
    ["scan", "induction", "--model", "toy-induction", "--out", "{file}"],
    ["scan", "induction", "--model", "toy-induction", "--seq-len", "200", "--out", "{tmp}/s2"],
    ["scan", "retrieval", "--model", "minilm-l6", "--out", "{tmp}/r"],
    ["scan", "retrieval", "--depths", "150", "--out", "{tmp}/r2"],
    ["scan", "sinks", "--model", "toy-induction", "--prompts", "{tmp}/flat.json", "--out", "{tmp}/k"],
    ["scan", "sinks", "--model", "toy-induction", "--prompts", "{tmp}/none.json", "--out", "{tmp}/k2"],
    ["calibrate", "--layers", "5:1", "--out", "{tmp}/c"],
    ["calibrate", "--model", "toy-induction", "--tasks", "bogus", "--out", "{tmp}/c2"],
    ["icl", "train", "--d", "0", "--out", "{tmp}/i"],
    ["icl", "train", "--heads", "0", "--out", "{tmp}/i"],
    ["icl", "train", "--steps", "0", "--out", "{tmp}/i"],
    ["icl", "train", "--lr", "nan", "--out", "{tmp}/i"],
    ["explore", "--port", "-1"],
    ["info", "--model", "toy-induction", "--device", "bogus"],
    ["info", "--model", "no-such-model"],
    ["train", "twins", "--kinds", "nope"],
]


@pytest.mark.parametrize("argv", CLI, ids=[" ".join(a[:3]) + f" #{i}" for i, a in enumerate(CLI)])
def test_cli_bad_inputs_exit_2_with_a_message(argv, tmp_path):
    (tmp_path / "flat.json").write_text(json.dumps([1, 2, 3]))
    (tmp_path / "afile").write_text("")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "afile") for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage error
            code = exit_.code
    message = err.getvalue()
    assert code == 2, (argv, code, message[-500:])
    assert "error:" in message and "Traceback" not in message, message[-500:]
    # a refused command leaves no half-made run folder behind
    assert not [p for p in tmp_path.iterdir() if p.name not in ("flat.json", "afile")], list(tmp_path.iterdir())
