"""Synthetic and windowed inputs, in one place: repeated random blocks (`[BOS] r r`), periodic sequences, text windows.

Pure torch (a leaf module): the analyses (induction scan, Razor's echo/induction input, the pruning task), the toy
model and the twins' trainers all build their token ids here, so "[BOS] r r" means one thing everywhere.
"""

from __future__ import annotations

import torch


def with_bos(body: torch.Tensor, bos: int) -> torch.Tensor:
    """`[B, 1 + T]`: a BOS column before `body` `[B, T]`."""
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=torch.long, device=body.device), body], dim=1)


def repeated_blocks(pool: torch.Tensor, *, batch: int, block: int, repeats: int, bos: int,
                    generator: torch.Generator) -> torch.Tensor:
    """`[batch, 1 + repeats·block]`: BOS, then a block of `block` tokens drawn uniformly from `pool`, `repeats` times.

    `[BOS] r r` (repeats = 2) is the induction scan's input; Razor's echo/induction input repeats more.
    """
    if block < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"repeated blocks need block, repeats, batch >= 1; got {block}, {repeats}, {batch}")
    rand = pool[torch.randint(len(pool), (batch, block), generator=generator)]
    return with_bos(rand.repeat(1, repeats), bos)


def periodic(batch: int, seq_len: int, vocab: int, *, generator: torch.Generator,
             period_range: tuple[int, int] = (4, 32), bos: int = 0) -> torch.Tensor:
    """`[batch, 1 + seq_len]`: BOS followed by a periodic sequence.

    For each row a period `d` is drawn uniformly from `period_range` (inclusive) and `d` random content tokens `r`
    from `1..vocab-1`; then `x[0] = BOS` and `x[1 + j] = r[j % d]`.
    """
    lo, hi = period_range
    if not 1 <= lo <= hi:
        raise ValueError(f"bad period_range {period_range}")
    d = torch.randint(lo, hi + 1, (batch, 1), generator=generator)
    r = torch.randint(1, vocab, (batch, hi), generator=generator)
    idx = torch.arange(seq_len).unsqueeze(0) % d  # [B, seq_len]
    return with_bos(torch.gather(r, 1, idx), bos)


def windows(ids: torch.Tensor, width: int, *, count: int | None = None, bos: int | None = None) -> torch.Tensor:
    """The first `count` (default: all) non-overlapping windows of `width` ids of a 1-D sequence, `[n, width]`, each
    after a BOS column when `bos` is given (`[n, 1 + width]`)."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    n = len(ids) // width if count is None else count
    if n < 1 or n * width > len(ids):
        raise ValueError(f"{len(ids)} ids hold {len(ids) // width} windows of {width}, not {n}")
    body = ids[: n * width].reshape(n, width)
    return body if bos is None else with_bos(body, bos)
