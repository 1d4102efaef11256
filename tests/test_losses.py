"""The one next-token loss against transformers' own `labels=` loss."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from conftest import tiny_config
from headlab.losses import next_token_losses


def test_matches_transformers_labels_loss_and_masks_padding():
    cls, cfg = tiny_config("gpt2")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        out = model(ids, labels=ids)
    losses = next_token_losses(out.logits, ids)
    assert losses.shape == (2, 11)
    assert losses.mean().item() == pytest.approx(out.loss.item(), rel=1e-6)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    masked = next_token_losses(out.logits, ids, mask)
    assert torch.isnan(masked[1, 7:]).all() and not torch.isnan(masked[:, :7]).any()
    assert torch.equal(next_token_losses(out.logits[0], ids[0]), losses[0])
    assert math.isclose(float(next_token_losses(torch.zeros(3, 5), torch.tensor([0, 1, 2])).mean()), math.log(5),
                        rel_tol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        next_token_losses(out.logits, ids[:, :5])
    assert isinstance(model, T.GPT2LMHeadModel)
