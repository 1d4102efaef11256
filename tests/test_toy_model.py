"""Tests for the bundled ``toy-induction`` model and its trainer."""

from __future__ import annotations

import json

import pytest
import torch

from headlab.models.toy import (
    MLP_PARAM_SUFFIXES,
    TOY_INDUCTION_DIR,
    evaluate_induction,
    mlp_parameters,
    periodic_batch,
    train_toy_induction,
)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _load(path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()


def test_periodic_batch_shape_and_structure():
    g = torch.Generator().manual_seed(0)
    x = periodic_batch(16, 64, 128, generator=g, period_range=(4, 32))
    assert x.shape == (16, 65) and x.dtype == torch.long
    assert (x[:, 0] == 0).all()
    body = x[:, 1:]
    assert ((body >= 1) & (body <= 127)).all()
    for row in body:
        # the smallest period d in [4, 32] with row[j] == row[j - d] everywhere exists
        assert any(torch.equal(row[d:], row[:-d]) for d in range(4, 33))
    # same generator state -> same batch
    assert torch.equal(
        periodic_batch(4, 64, 128, generator=torch.Generator().manual_seed(3)),
        periodic_batch(4, 64, 128, generator=torch.Generator().manual_seed(3)),
    )


def test_train_short_run(tmp_path):
    out = tmp_path / "toy"
    m = train_toy_induction(out, steps=30, seed=0, progress=False)

    # loss went down
    assert m["loss_last_10_mean"] < m["loss_first_10_mean"]

    # folder contents
    for name in ("config.json", "model.safetensors", "model_card.md", "training.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "training.json").read_text())["settings"]["steps"] == 30
    # the trainer compared the in-memory model with the reloaded folder
    assert m["reload_max_abs_diff"] == 0.0

    # MLPs are still exactly zero after training and saving
    model = _load(out)
    mlp = mlp_parameters(model)
    assert len(mlp) == 2 * len(MLP_PARAM_SUFFIXES)
    for name, p in mlp.items():
        assert torch.count_nonzero(p).item() == 0, name

    # deterministic for a seed: a second run gives bitwise-identical weights/logits
    out2 = tmp_path / "toy2"
    m2 = train_toy_induction(out2, steps=30, seed=0, progress=False)
    assert m2["final_loss"] == m["final_loss"]
    x = periodic_batch(8, 64, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, _load(out2)(x).logits)


@pytest.mark.skipif(not (TOY_INDUCTION_DIR / "model.safetensors").is_file(), reason="data/toy-induction not built")
def test_committed_model_has_induction_heads():
    model = _load(TOY_INDUCTION_DIR)
    for name, p in mlp_parameters(model).items():
        assert torch.count_nonzero(p).item() == 0, name

    # fresh random [BOS]+r+r sequences (a seed other than the model card's)
    ev = evaluate_induction(model, seed=20240611, batch=128, rep_len=32)
    assert ev["second_copy_loss"] < 0.3 * ev["first_copy_loss"], ev
    assert max(ev["induction_score"][1]) > 0.3, ev["induction_score"]
