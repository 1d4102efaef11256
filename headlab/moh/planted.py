"""A planted router: a byte-level model whose embeddings mark punctuation and digits along two known directions, and
a `LearnedRouter` with hand-set weights that sends punctuation to one routed head and digits to another. The routing
analytics must find exactly that (the ground truth of the tests and of notebooks/moh_routing.ipynb)."""

from __future__ import annotations

import string

import torch

from headlab.edits.moh import LearnedRouter, MoH
from headlab.models.head_model import HeadModel

#: planted routing of layer 0: token type → the routed head it goes to
PLANTED = {"punctuation": 3, "number": 2}


def planted_router_model(*, strength: float = 8.0, router_gain: float = 10.0,
                         seed: int = 0) -> tuple[HeadModel, MoH, dict[str, int]]:
    """(model, MoH edit, planted {token type: head of layer 0}).

    The model: headlab's own softmax LM (2 layers × 4 heads, width 64, byte tokenizer), random weights but for the
    embeddings: every punctuation byte gets `strength` along coordinate 0, every digit along coordinate 1, and the
    positions are zero, so layer 0's normalised input carries the token type on those two coordinates. The edit:
    heads 0–1 shared, one of heads 2–3 routed per token, by a router whose weights read coordinate 1 for head 2 and
    coordinate 0 for head 3 (× `router_gain`, far above the standardised query norms it is added to).
    """
    from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM
    from headlab.models.linear.tokenizer import byte_tokenizer

    torch.manual_seed(seed)
    cfg = HeadlabLinearConfig(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=0, layer_kinds="softmax", max_position_embeddings=256,
                              bos_token_id=256, pad_token_id=256, eos_token_id=256)
    hf = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.embed_positions.weight.zero_()
        for ch in string.punctuation:
            hf.model.embed_tokens.weight[ord(ch), 0] += strength
        for ch in string.digits:
            hf.model.embed_tokens.weight[ord(ch), 1] += strength
    model = HeadModel(hf, byte_tokenizer(), name="planted-router")
    router = LearnedRouter([0], n_routed=2, hidden_size=64)
    with torch.no_grad():
        router.weight[0, PLANTED["number"] - 2, 1] = router_gain
        router.weight[0, PLANTED["punctuation"] - 2, 0] = router_gain
    return model, MoH(active=1, shared=2, router=router, layers=(0,)), dict(PLANTED)
