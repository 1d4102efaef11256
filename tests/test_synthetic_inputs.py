"""headlab.inputs: the one place synthetic inputs are built; the scans' and the toy model's inputs agree."""

from __future__ import annotations

import pytest
import torch

from headlab.inputs import periodic, repeated_blocks, windows, with_bos
from headlab.models.toy import repeated_batch


def test_repeated_blocks_repeat_one_block_after_bos():
    x = repeated_blocks(torch.arange(5, 9), batch=3, block=4, repeats=3, bos=1, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 13) and (x[:, 0] == 1).all()
    assert torch.equal(x[:, 1:5], x[:, 5:9]) and torch.equal(x[:, 1:5], x[:, 9:13])
    assert ((x[:, 1:] >= 5) & (x[:, 1:] <= 8)).all()


def test_toy_eval_batch_is_the_scan_builder():
    a = repeated_batch(4, 6, 128, generator=torch.Generator().manual_seed(3))
    b = repeated_blocks(torch.arange(1, 128), batch=4, block=6, repeats=2, bos=0,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_periodic_and_windows():
    x = periodic(8, 40, 50, generator=torch.Generator().manual_seed(0), period_range=(5, 5), bos=7)
    assert (x[:, 0] == 7).all() and torch.equal(x[:, 1:36], x[:, 6:41])
    ids = torch.arange(23)
    w = windows(ids, 5, bos=99)
    assert w.shape == (4, 6) and (w[:, 0] == 99).all() and torch.equal(w[1, 1:], torch.arange(5, 10))
    assert windows(ids, 5, count=2).shape == (2, 5)
    with pytest.raises(ValueError, match="hold 4 windows"):
        windows(ids, 5, count=5)
    with pytest.raises(ValueError, match="period_range"):
        periodic(1, 4, 10, generator=torch.Generator(), period_range=(3, 2))
    assert with_bos(torch.zeros(2, 3, dtype=torch.long), 1).tolist() == [[1, 0, 0, 0]] * 2
