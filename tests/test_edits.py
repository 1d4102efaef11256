"""Scoped head edits: exact effects, exact restoration, isolation between threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import headlab as hl
from conftest import VOCAB


@pytest.fixture(scope="module")
def llama(tiny_folder):
    return hl.load(tiny_folder("llama"), device="cpu")


def _ids(seed=0, shape=(2, 21)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits_with_slice_hook(model, layer, head, fn):
    """Logits with `fn` applied to head's slice of the output-projection input (a plain torch pre-hook)."""
    d = model.head_dim

    def pre_hook(_module, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = fn(x[..., head * d:(head + 1) * d])
        return (x,) + args[1:]

    handle = model.out_proj(layer).register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            return model.hf(_ids()).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_ablation_equals_zeroing_the_out_proj_input_slice(family, tiny_folder):
    model = hl.load(tiny_folder(family), device="cpu")
    expected = _logits_with_slice_hook(model, 1, 2, torch.zeros_like)
    with hl.edit(model, [hl.Ablate(hl.HeadRef(1, 2))]), torch.no_grad():
        got = model.hf(_ids()).logits
    with torch.no_grad():
        clean = model.hf(_ids()).logits
    assert (got - expected).abs().max().item() < 1e-6
    assert (got - clean).abs().max().item() > 1e-3


def test_scale_equals_scaling_the_slice(llama):
    expected = _logits_with_slice_hook(llama, 0, 3, lambda x: 2.5 * x)
    with hl.edit(llama, hl.Scale(hl.HeadRef(0, 3), factor=2.5)), torch.no_grad():
        got = llama.hf(_ids()).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_nested_scales_multiply(llama):
    head = hl.HeadRef(1, 1)
    with hl.edit(llama, hl.Scale(head, factor=0.5)), hl.edit(llama, hl.Scale(head, factor=0.5)), torch.no_grad():
        nested = llama.hf(_ids()).logits
    with hl.edit(llama, hl.Scale(head, factor=0.25)), torch.no_grad():
        once = llama.hf(_ids()).logits
    assert torch.allclose(nested, once, atol=1e-6)


def test_uniform_ablation_averages_the_visible_values(llama):
    head = hl.HeadRef(1, 3)
    with hl.edit(llama, hl.Ablate(head, how="uniform")):
        run = llama.run(_ids(shape=(1, 12)), layers=[1], with_z=True)
    v = run.v(head)[0]  # [S, D]
    expected = v.cumsum(0) / torch.arange(1, v.shape[0] + 1)[:, None]
    assert torch.allclose(run.records[1].z[0, :, head.head], expected, atol=1e-5)


def test_mean_ablation_uses_the_reference_mean(llama):
    head = hl.HeadRef(0, 1)
    reference = _ids(seed=5, shape=(3, 16))
    clean = llama.run(reference, layers=[0], with_z=True)
    mean = clean.records[0].z[:, :, head.head].reshape(-1, llama.head_dim).mean(0)
    with hl.edit(llama, hl.Ablate(head, how="mean", reference=reference)):
        run = llama.run(_ids(), layers=[0], with_z=True)
    z = run.records[0].z[:, :, head.head]
    assert torch.allclose(z, mean.expand_as(z), atol=1e-6)
    with pytest.raises(hl.EditError, match="reference"):
        hl.Ablate(head, how="mean")


def test_model_restored_bit_for_bit_even_when_the_body_raises(llama):
    params = {k: v.clone() for k, v in llama.hf.state_dict().items()}
    with torch.no_grad():
        before = llama.hf(_ids()).logits
    edits = [hl.Ablate(hl.HeadRef(0, 0)), hl.Ablate(hl.HeadRef(1, 1), how="uniform"),
             hl.Scale(hl.HeadRef(1, 2), factor=3.0), hl.Ablate(hl.HeadRef(0, 2), how="mean", reference=_ids(9))]
    with pytest.raises(RuntimeError, match="boom"):
        with hl.edit(llama, edits):
            with torch.no_grad():
                assert not torch.equal(llama.hf(_ids()).logits, before)
            raise RuntimeError("boom")
    with torch.no_grad():
        after = llama.hf(_ids()).logits
    assert torch.equal(before, after)
    for k, v in llama.hf.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_edits_are_private_to_their_thread(llama):
    heads = [hl.HeadRef(0, 0), hl.HeadRef(1, 3)]
    expected = {}
    for h in heads:
        with hl.edit(llama, hl.Ablate(h)), torch.no_grad():
            expected[h] = llama.hf(_ids()).logits
    with torch.no_grad():
        clean = llama.hf(_ids()).logits
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def work(h):
        try:
            with hl.edit(llama, hl.Ablate(h)):
                barrier.wait(timeout=10)  # both scopes open at once
                with torch.no_grad():
                    results[h] = [llama.hf(_ids()).logits for _ in range(3)]
                barrier.wait(timeout=10)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(h,)) for h in heads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for h in heads:
        for logits in results[h]:
            assert torch.equal(logits, expected[h])
    with torch.no_grad():
        assert torch.equal(llama.hf(_ids()).logits, clean)


def test_a_deep_copy_is_not_edited_through_the_original(llama):
    twin = copy.deepcopy(llama.hf)
    with torch.no_grad():
        clean = twin(_ids()).logits
    with hl.edit(llama, hl.Ablate(hl.HeadRef(1, 0))), torch.no_grad():
        assert torch.equal(twin(_ids()).logits, clean)


def test_bad_edits_are_named(llama):
    with pytest.raises(hl.HeadIndexError, match="out of range"):
        with hl.edit(llama, hl.Ablate(hl.HeadRef(5, 0))):
            pass
    with pytest.raises(hl.HeadIndexError, match="heads 0..3"):
        with hl.edit(llama, hl.Ablate(hl.HeadRef(0, 4))):
            pass
    with pytest.raises(hl.EditError, match="not an ablation"):
        hl.Ablate(hl.HeadRef(0, 0), how="shuffle")
    with pytest.raises(hl.EditError, match="not a head edit"):
        with hl.edit(llama, ["L0H0"]):
            pass


def test_custom_override_edit_reproduces_the_head_when_its_pattern_is_untouched(llama):
    """An edit object with layer_ops(): `attend` with the identity transform changes nothing (to fp noise)."""
    from headlab.capture import HeadOverride, LayerOps, attend

    class Recompute:
        def layer_ops(self, model):
            return {1: LayerOps(overrides=(HeadOverride((0, 3), lambda rec, heads: attend(rec, heads)),))}

    class Halve:
        def layer_ops(self, model):
            return {1: LayerOps(overrides=(HeadOverride((2,), lambda rec, heads: attend(rec, heads, lambda p: p / 2)),))}

    with torch.no_grad():
        clean = llama.hf(_ids()).logits
    with hl.edit(llama, Recompute()), torch.no_grad():
        assert (llama.hf(_ids()).logits - clean).abs().max().item() < 1e-5
    expected = _logits_with_slice_hook(llama, 1, 2, lambda x: x / 2)
    with hl.edit(llama, [Halve()]), torch.no_grad():
        assert (llama.hf(_ids()).logits - expected).abs().max().item() < 1e-5


def test_scale_takes_a_scalar_tensor_and_gives_its_gradient(llama):
    """A 0-dim tensor factor acts like the number, and ∂loss/∂factor flows back through the seam (AtP's edit)."""
    ids = [[1, 5, 9, 2, 7, 5, 9, 2]]
    head = hl.HeadRef(1, 2)
    with hl.edit(llama, hl.Scale(head, factor=0.5)):
        expected = llama.loss(ids)
    a = torch.tensor(0.5, requires_grad=True)
    with hl.edit(llama, hl.Scale(head, factor=a)):
        loss = llama.loss(ids, grad=True)
    assert torch.equal(loss.detach(), expected)
    (grad,) = torch.autograd.grad(loss, a)
    eps = 1e-3
    with hl.edit(llama, hl.Scale(head, factor=0.5 + eps)):
        up = llama.loss(ids)
    with hl.edit(llama, hl.Scale(head, factor=0.5 - eps)):
        down = llama.loss(ids)
    assert float(grad) == pytest.approx(float(up - down) / (2 * eps), rel=1e-2, abs=1e-5)


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), "2", None, torch.ones(2), torch.tensor(float("nan"))])
def test_scale_refuses_factors_that_are_not_finite_numbers(factor):
    with pytest.raises(hl.EditError, match="Scale"):
        hl.Scale(hl.HeadRef(0, 0), factor=factor)


def test_mean_ablation_reference_ignores_outer_edits(llama):
    """The reference mean is taken with no edits active, also when the mean ablation is nested in another edit."""
    from headlab.edits.heads import mean_head_outputs

    ref = [[1, 5, 9, 2, 7, 5, 9, 2], [3, 4, 8, 8, 1, 2, 6, 7]]
    clean = mean_head_outputs(llama, ref, [0, 1])
    with hl.edit(llama, [hl.Scale(hl.HeadRef(0, 1), factor=3.0), hl.Ablate(hl.HeadRef(1, 2))]):
        nested = mean_head_outputs(llama, ref, [0, 1])
    assert all(torch.equal(clean[l], nested[l]) for l in (0, 1))


def test_capturing_records_a_decode_loop_and_forward_cached_matches_a_full_forward(llama):
    ids = torch.tensor([[1, 5, 9, 2, 7, 5, 9, 2]])
    full = llama.hf(ids).logits[0, -1]
    with llama.capturing(layers=[1]) as capture:
        logits, cache = llama.forward_cached(ids[:, :-1])
        seen = capture.records[1].q.shape[2]
        logits, cache = llama.forward_cached(ids[:, -1:], cache)
    assert seen == 7 and capture.records[1].q.shape[2] == 1 and capture.records[1].k.shape[2] == 8
    assert (logits - full).abs().max() < 1e-5
    with pytest.raises(hl.HeadIndexError):
        with llama.capturing(layers=[9]):
            pass


def test_nested_output_edits_compose_in_nesting_order(llama):
    """Inner Scale under an outer mean ablation scales the mean; an inner mean ablation wins over an outer Scale."""
    ref = [[1, 5, 9, 2, 7, 5, 9, 2], [3, 4, 8, 8, 1, 2, 6, 7]]
    ids = [[2, 4, 6, 8, 1, 3]]
    head = hl.HeadRef(1, 2)
    seen = {}
    handle = llama.out_proj(1).register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].detach().clone()))
    try:
        with hl.edit(llama, hl.Ablate(head, how="mean", reference=ref)):
            llama.run(ids)
            mean = seen["z"][..., 2 * 16:3 * 16].clone()
            with hl.edit(llama, hl.Scale(head, factor=3.0)):
                llama.run(ids)
                assert torch.allclose(seen["z"][..., 2 * 16:3 * 16], 3.0 * mean)
        with hl.edit(llama, hl.Scale(head, factor=3.0)):
            with hl.edit(llama, hl.Ablate(head, how="mean", reference=ref)):
                llama.run(ids)
                assert torch.allclose(seen["z"][..., 2 * 16:3 * 16], mean)
    finally:
        handle.remove()
