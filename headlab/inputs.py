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


def mqar(batch: int, seq_len: int, num_pairs: int, vocab: int, *, num_queries: int | None = None,
         generator: torch.Generator | None = None, seed: int | None = None, filler: int = 0,
         power_a: float | None = None, repeat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): `(ids, answers)`, both `[batch, seq_len]`.

    Each row opens with `num_pairs` key-value pairs `k1 v1 k2 v2 …` (2·num_pairs tokens); the rest, the query
    region, is filler (token `filler`, 0 by default) holding `num_queries` queries `k v` (default: every pair, each
    once, in random order): a key of the context followed by its value. The queries sit at distinct even offsets 2g
    of the query region with filler between them: g uniform over its (seq_len − 2·num_pairs) // 2 slots, or, with
    `power_a` = a, as Zoology's, P(g) ∝ (g + 1)^(a − 1) (a = 0.01 there: most queries close to the context).
    With `repeat` the queried pairs are drawn with replacement, so `num_queries` may exceed `num_pairs`, up to every
    slot (a dense query region); a key asked again is still answered by its value.

    `answers` (bool) is True at the value of each query: the token to predict from the query key just before it. A
    loss or accuracy reads only those positions; as HF labels, `ids.masked_fill(~answers, -100)` (the LM's shift
    aligns each with the prediction at its key).

    Keys and values come from disjoint halves of the vocabulary, as Zoology's: keys 1..vocab//2 − 1, values
    vocab//2..vocab − 1 (token 0 is left to the filler); a row's keys are distinct, and so are its values.

    Seeded: pass `generator`, or `seed` (default 0) for a fresh one; the same seed gives the same batch. ValueError
    for impossible settings: more pairs than keys in the vocabulary, a sequence too short for the pairs and queries,
    more queries than pairs without `repeat`.
    """
    if generator is not None and seed is not None:
        raise ValueError("give a generator or a seed, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    num_queries = num_pairs if num_queries is None else num_queries
    if batch < 1 or num_pairs < 1 or num_queries < 1:
        raise ValueError(f"MQAR needs batch, num_pairs, num_queries >= 1; got {batch}, {num_pairs}, {num_queries}")
    n_keys = vocab // 2 - 1
    if num_pairs > n_keys:
        raise ValueError(f"{num_pairs} pairs need {num_pairs} distinct keys, but a vocabulary of {vocab} holds "
                         f"{max(n_keys, 0)} (keys 1..{vocab // 2 - 1}, values {vocab // 2}..{vocab - 1})")
    if num_queries > num_pairs and not repeat:
        raise ValueError(f"{num_queries} queries of {num_pairs} pairs: each key is queried at most once "
                         "(repeat=True asks keys again)")
    if not 0 <= filler < vocab:
        raise ValueError(f"filler token {filler} is outside the vocabulary of {vocab}")
    context = 2 * num_pairs
    slots = (seq_len - context) // 2  # places for a query (key, value) in the query region
    if slots < num_queries:
        raise ValueError(f"a sequence of {seq_len} tokens is too short for {num_pairs} pairs and {num_queries} "
                         f"queries: they need {context + 2 * num_queries} tokens")
    draw = lambda n, k: torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :k]  # noqa: E731 (k of n, no repeats)
    keys = draw(n_keys, num_pairs) + 1
    values = draw(vocab - vocab // 2, num_pairs) + vocab // 2
    ids = torch.full((batch, seq_len), filler, dtype=torch.long)
    ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
    # which pairs are queried, in the order of their slots
    asked = (torch.randint(num_pairs, (batch, num_queries), generator=generator) if repeat
             else draw(num_pairs, num_queries))
    if power_a is None:
        gaps = draw(slots, num_queries)
    else:
        if not 0 < power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {power_a!r}")
        p = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
        gaps = torch.multinomial(p.expand(batch, -1), num_queries, replacement=False, generator=generator)
    where = gaps.sort(dim=1).values * 2 + context  # the query keys' positions
    ids.scatter_(1, where, keys.gather(1, asked))
    ids.scatter_(1, where + 1, values.gather(1, asked))
    answers = torch.zeros(batch, seq_len, dtype=torch.bool)
    answers.scatter_(1, where + 1, True)
    return ids, answers
