"""A hand-built two-layer induction circuit whose wiring is known, for checking the circuit tools.

Attention-only, two layers of two heads (headlab's own model family, softmax layers, learned absolute positions), the
residual stream split into orthogonal subspaces (all zero-mean, so the LayerNorms only rescale):

    token · position · previous token · output · junk

- L0H0, the previous-token head: query and key read positions (query i matches key i − 1); it copies the token into
  the previous-token subspace.
- L0H1, a distractor: attends to its own position and copies the token into the junk subspace (read by nobody).
- L1H0, the induction head: its query reads the token, its key reads the previous-token subspace (K-composition with
  L0H0): it attends to the token after an earlier occurrence of the current one and copies it to the output subspace,
  which the unembedding reads.
- L1H1, a distractor: attends to its own position and writes the junk subspace.

So the only path from the input to the logits that matters for induction is L0H0 → (key of) L1H0 → logits: path
patching must find exactly the edge L0H0 → L1H0 via k, and K-composition must rank it first.
"""

from __future__ import annotations

import torch

from headlab.models.head_model import HeadModel
from headlab.tasks.circuits import CircuitBatch

VOCAB = 10
POSITIONS = 20
HIDDEN = 64
HEAD_DIM = 32


def _basis(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """`n` orthonormal zero-mean vectors of R^dim (rows)."""
    raw = torch.randn(dim, n, generator=generator, dtype=torch.float64)
    raw = raw - raw.mean(0, keepdim=True)
    ones = torch.ones(dim, 1, dtype=torch.float64) / dim ** 0.5
    q, _ = torch.linalg.qr(torch.cat([ones, raw], dim=1))
    return q[:, 1:n + 1].T.float()


def planted_induction_model(*, seed: int = 0, sharpness: float = 20.0) -> HeadModel:
    """The planted model (see the module docstring) as a HeadModel; `sharpness` is the attention logit of a match."""
    from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM

    g = torch.Generator().manual_seed(seed)
    basis = _basis(VOCAB + POSITIONS + 3 * VOCAB, HIDDEN, g)
    tok, pos = basis[:VOCAB], basis[VOCAB:VOCAB + POSITIONS]
    prev = basis[VOCAB + POSITIONS: 2 * VOCAB + POSITIONS]
    out = basis[2 * VOCAB + POSITIONS: 3 * VOCAB + POSITIONS]
    junk = basis[3 * VOCAB + POSITIONS:]
    cfg = HeadlabLinearConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                              head_dim=HEAD_DIM, intermediate_size=0, layer_kinds="softmax",
                              max_position_embeddings=POSITIONS, tie_word_embeddings=False, layer_norm_eps=1e-6)
    model = HeadlabLinearForCausalLM(cfg).eval()
    eye = torch.eye(HEAD_DIM)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.model.norm] + [b.ln_attn for b in model.model.layers]:
            ln.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_(tok)
        model.model.embed_positions.weight.copy_(pos)
        # LayerNorm of a sum of m orthonormal zero-mean vectors multiplies it by sqrt(HIDDEN / m)
        c0, c1, cf = (HIDDEN / 2) ** 0.5, (HIDDEN / 4) ** 0.5, (HIDDEN / 5) ** 0.5
        scale = HEAD_DIM ** 0.5
        l0, l1 = model.model.layers[0].attn, model.model.layers[1].attn
        half = slice(0, HEAD_DIM), slice(HEAD_DIM, 2 * HEAD_DIM)

        def put(linear, rows: slice, src: torch.Tensor, dst: torch.Tensor, gain: float) -> None:
            """linear maps src[i] (residual) → gain · dst[i] (head space), for the head whose rows are `rows`."""
            linear.weight[rows] += gain * dst.T @ src

        shifted = torch.cat([eye[1:POSITIONS], torch.zeros(1, HEAD_DIM)])[:POSITIONS]  # key j → u_{j+1}
        # L0H0: previous-token head
        put(l0.q_proj, half[0], pos, eye[:POSITIONS], sharpness * scale / c0 ** 2)
        put(l0.k_proj, half[0], pos, shifted, 1.0)
        put(l0.v_proj, half[0], tok, eye[:VOCAB], 1.0)
        l0.o_proj.weight[:, half[0]] += prev.T @ eye[:VOCAB] / c0
        # L0H1: attends to itself, writes junk
        put(l0.q_proj, half[1], pos, eye[:POSITIONS], sharpness * scale / c0 ** 2)
        put(l0.k_proj, half[1], pos, eye[:POSITIONS], 1.0)
        put(l0.v_proj, half[1], tok, eye[:VOCAB], 1.0)
        l0.o_proj.weight[:, half[1]] += junk.T @ eye[:VOCAB] / c0
        # L1H0: induction head (query: token; key: previous token)
        put(l1.q_proj, half[0], tok, eye[:VOCAB], sharpness * scale / c1 ** 2)
        put(l1.k_proj, half[0], prev, eye[:VOCAB], 1.0)
        put(l1.v_proj, half[0], tok, eye[:VOCAB], 1.0)
        l1.o_proj.weight[:, half[0]] += out.T @ eye[:VOCAB] / c1
        # L1H1: attends to itself, writes junk
        put(l1.q_proj, half[1], pos, eye[:POSITIONS], sharpness * scale / c1 ** 2)
        put(l1.k_proj, half[1], pos, eye[:POSITIONS], 1.0)
        put(l1.v_proj, half[1], tok, eye[:VOCAB], 1.0)
        l1.o_proj.weight[:, half[1]] += junk.T @ eye[:VOCAB] / c1
        model.lm_head.weight.copy_(5.0 * out / cf)
    return HeadModel(model, name="planted-induction")


def planted_induction_task(n: int, *, seed: int = 0, block: int = 8, prefix: int = 5) -> CircuitBatch:
    """Clean: `block` distinct tokens, then their first `prefix` again (the answer: the next token of the block).
    Corrupted: the first occurrence of the last token replaced by a token outside the block (no earlier match).
    The wrong token is another token of the block."""
    if not 1 <= prefix < block <= VOCAB - 1 or 2 * block > POSITIONS:
        raise ValueError(f"block {block} / prefix {prefix} do not fit {VOCAB} tokens and {POSITIONS} positions")
    g = torch.Generator().manual_seed(seed)
    clean, corrupt, answer, wrong = [], [], [], []
    for _ in range(n):
        perm = torch.randperm(VOCAB, generator=g).tolist()
        r, spare = perm[:block], perm[block]
        ids = r + r[:prefix]
        bad = list(ids)
        bad[prefix - 1] = spare
        clean.append(ids)
        corrupt.append(bad)
        answer.append(r[prefix])
        wrong.append(r[(prefix + 1) % block])
    end = torch.full((n,), block + prefix - 1)
    return CircuitBatch(task="planted_induction", clean=clean, corrupt=corrupt, answer=torch.tensor(answer),
                        wrong=torch.tensor(wrong), positions={"end": end, "first": torch.full((n,), prefix - 1)},
                        meta={"seed": seed, "n": n, "block": block, "prefix": prefix})
