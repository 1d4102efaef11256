"""Tests for the bundled ``toy-induction`` model and its trainer."""

from __future__ import annotations

import json

import pytest
import torch

import headlab as hl
from headlab.analyses import InductionParams
from headlab.models.toy import (
    MLP_PARAM_SUFFIXES,
    PHASES,
    TOY_INDUCTION_DIR,
    Phase,
    evaluate_induction,
    mlp_parameters,
    periodic_batch,
    spread_position_ids,
    train_toy_induction,
)

TINY_PHASES = (Phase("form", 12, 8, 32, (8, 16)), Phase("spread", 12, 8, 32, (8, 16), spread=True),
               Phase("full", 6, 4, 255, (8, 128)))


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
    m = train_toy_induction(out, phases=TINY_PHASES, seed=0, progress=False)

    # loss went down
    assert m["loss_last_10_mean"] < m["loss_first_10_mean"]

    # folder contents
    for name in ("config.json", "model.safetensors", "model_card.md", "training.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "training.json").read_text())
    assert saved["settings"]["steps"] == 30 and [p["name"] for p in saved["settings"]["phases"]] == ["form", "spread", "full"]
    assert set(saved["eval_by_length"]["lengths"]) == {"16", "32", "50", "64", "100", "127"}
    assert "| 127 |" in (out / "model_card.md").read_text()
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
    m2 = train_toy_induction(out2, phases=TINY_PHASES, seed=0, progress=False)
    assert m2["final_loss"] == m["final_loss"]
    x = periodic_batch(8, 64, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, _load(out2)(x).logits)


def test_spread_position_ids_keep_bos_at_zero_and_stay_in_context():
    g = torch.Generator().manual_seed(0)
    x = periodic_batch(64, 64, 128, generator=g)
    pos = spread_position_ids(x, 256, generator=g)
    assert (pos[:, 0] == 0).all() and int(pos.max()) <= 255
    assert (pos[:, 2:] - pos[:, 1:-1] == 1).all()  # contiguous after BOS
    assert len(set(pos[:, 1].tolist())) > 20  # offsets vary


def test_default_recipe_covers_the_context():
    assert max(p.seq_len for p in PHASES) + 1 == 256 and any(p.spread for p in PHASES)


@pytest.mark.skipif(not (TOY_INDUCTION_DIR / "model.safetensors").is_file(), reason="data/toy-induction not built")
def test_committed_model_has_induction_heads():
    model = _load(TOY_INDUCTION_DIR)
    for name, p in mlp_parameters(model).items():
        assert torch.count_nonzero(p).item() == 0, name

    # fresh random [BOS]+r+r sequences (a seed other than the model card's), HF's own eager patterns
    for n in (16, 32, 127):
        ev = evaluate_induction(model, seed=20240611, batch=64, rep_len=n)
        assert ev["second_copy_loss"] < 0.5, (n, ev["second_copy_loss"])
        assert max(ev["induction_score"][1]) > 0.7, (n, ev["induction_score"])


@pytest.fixture(scope="module")
def toy():
    return hl.load("toy-induction", device="cpu")


@pytest.mark.parametrize("n", [50, 100])
def test_circuit_at_the_scan_lengths_and_ablating_the_previous_token_head_breaks_it(toy, n):
    """The scan's own numbers (headlab's seam, not HF eager) at the default N = 50 and at N = 100."""
    scores = hl.scan.induction(toy, InductionParams(seq_len=n, batch=16, seed=7), progress=False)
    assert float(scores.maps["induction"][1].max()) >= 0.7, scores.maps["induction"]
    assert scores.meta["loss_second_copy"] < 0.5, scores.meta
    prev = max(toy.heads([0]), key=lambda h: float(scores.maps["prev_token"][h.layer, h.head]))
    assert float(scores.maps["prev_token"][prev.layer, prev.head]) >= 0.7
    tokens = scores.items["tokens"]

    def second_copy_loss():
        return toy.token_losses(tokens)[:, n + 1:2 * n].mean().item()

    clean = second_copy_loss()
    assert abs(clean - scores.meta["loss_second_copy"]) < 1e-4
    with hl.edit(toy, [hl.Ablate(prev)]):
        broken = second_copy_loss()
    # the effect is specific: some other layer-0 head can go without breaking the circuit
    controls = []
    for other in toy.heads([0]):
        if other != prev:
            with hl.edit(toy, [hl.Ablate(other)]):
                controls.append(second_copy_loss())
    assert broken > 2.0 and broken > 5 * clean, (clean, broken)
    assert min(controls) < 0.5, controls
    assert second_copy_loss() == clean
