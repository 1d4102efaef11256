"""The two real bundled models: pattern parity with HF eager and TransformerBridge, and known induction heads.

SmolLM2 weights are a 4-bit (Q4_1) dequantisation of the instruct model.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.analyses.induction import InductionParams, induction_scan
from headlab.models.bundled import BUNDLED

pytestmark = pytest.mark.slow

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. In the beginning God created")


def _bridge_patterns(folder, hf_model, tokenizer, ids):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer, device="cpu")
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(len(cache))]


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return hl.load("smollm2-135m", device="cpu")


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
def test_real_patterns_match_hf_eager_and_bridge(name):
    torch.set_num_threads(2)
    folder = BUNDLED[name].folder()
    model = hl.load(name, device="cpu")
    tokenizer = model.tokenizer
    ids = model.encode(TEXT, prepend_bos=model.causal).input_ids
    run = model.run(ids)
    cls = type(model.hf)
    eager = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True).attentions
    hf_err = max((run.patterns(l) - ref[l]).abs().max().item() for l in range(model.n_layers))
    assert hf_err < 1e-5, hf_err

    bridge_model = T.AutoModelForMaskedLM if name == "minilm-l6" else T.AutoModelForCausalLM
    tb_hf = bridge_model.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    patterns = _bridge_patterns(folder, tb_hf, tokenizer, ids)
    assert len(patterns) == model.n_layers
    tb_err = max((run.patterns(l) - patterns[l]).abs().max().item() for l in range(model.n_layers))
    assert tb_err < 1e-5, tb_err
    print(f"{name}: max |pattern - HF eager| = {hf_err:.2e}, max |pattern - TransformerBridge| = {tb_err:.2e}")


def test_smollm2_known_induction_heads_and_their_ablation(smollm2):
    params = InductionParams(seq_len=40, batch=8, seed=0)
    scores = induction_scan(smollm2, params, progress=False)
    top = [h for h, _ in scores.top(5)]
    assert {hl.HeadRef(18, 6), hl.HeadRef(17, 3), hl.HeadRef(17, 4)} <= set(top)
    assert scores.meta["loss_second_copy"] < 0.4 * scores.meta["loss_first_copy"]

    tokens = scores.items["tokens"]
    n = params.seq_len

    def second_copy_loss():
        return smollm2.token_losses(tokens)[:, n + 1:2 * n].mean().item()

    base = second_copy_loss()
    with hl.edit(smollm2, hl.ablate(top[:3])):
        ablated = second_copy_loss()
    gen = torch.Generator().manual_seed(1)
    others = [h for h in smollm2.heads() if h not in top[:3]]
    with hl.edit(smollm2, hl.ablate([others[i] for i in torch.randperm(len(others), generator=gen)[:3]])):
        random3 = second_copy_loss()
    assert ablated > base + 0.5 and ablated > random3
    assert second_copy_loss() == pytest.approx(base, abs=0)


def test_smollm2_text_roundtrip(smollm2):
    run = smollm2.run("The capital of France is")
    assert run.tokens() == ["The", " capital", " of", " France", " is"]
    assert smollm2.tokenizer.decode(run.logits[0, -1].argmax()) == " Paris"
    texts = ["The capital of France is", "Once upon a time, in a land far away, there lived a king"]
    batched = smollm2.run(texts, layers=[17])
    assert batched.batch.attention_mask[0].sum() == 5
    alone = smollm2.run(texts[0], layers=[17]).patterns(17)[0]
    assert torch.allclose(batched.patterns(17)[0, :, :5, :5], alone, atol=1e-5)
    assert torch.allclose(batched.patterns(17, heads=[3])[0, 0, :5, :5], alone[3], atol=1e-5)
