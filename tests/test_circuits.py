"""Circuits: the Patch edit, resuming from a layer, exact / path / attribution patching, reuse, on tiny models and on
the planted induction circuit whose wiring is known."""

from __future__ import annotations

import pytest
import torch

import headlab as hl
from conftest import VOCAB
from headlab.circuits import (Circuit, DiscoverParams, PatchingError, agreement, atp, atp_star, compare, discover,
                              exact_patching, load_comparison, overlap, path_patching, prepare, top_heads)
from headlab.circuits.planted import planted_induction_model, planted_induction_task
from headlab.heads import HeadRef
from headlab.tasks.circuits import CircuitBatch


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_folder):
    return hl.load(tiny_folder(request.param), device="cpu")


@pytest.fixture(scope="module")
def planted():
    return planted_induction_model()


def _ids(seed, shape=(3, 12)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(ids).logits


def test_patch_z_everywhere_equals_the_other_runs_output_and_restores(tiny):
    clean, corrupt = _ids(0), _ids(1)
    head = HeadRef(1, 2)
    other = tiny.run(corrupt, layers=[1], with_z=True)
    before = _logits(tiny, clean)
    with hl.edit(tiny, hl.Patch(head, z=other.z(head))):
        inside = tiny.run(clean, layers=[1], with_z=True)
    assert torch.equal(inside.z(head), other.z(head))
    assert not torch.equal(inside.z(HeadRef(1, 1)), other.z(HeadRef(1, 1)))
    assert torch.equal(_logits(tiny, clean), before)


def test_patch_positions_and_rows(tiny):
    clean, corrupt = _ids(0), _ids(1)
    head = HeadRef(0, 1)
    base = tiny.run(clean, layers=[0], with_z=True).z(head)
    other = tiny.run(corrupt, layers=[0], with_z=True).z(head)
    with hl.edit(tiny, hl.Patch(head, z=other, positions=[2, 5])):
        got = tiny.run(clean, layers=[0], with_z=True).z(head)
    assert torch.equal(got[:, [2, 5]], other[:, [2, 5]])
    keep = [i for i in range(12) if i not in (2, 5)]
    assert torch.equal(got[:, keep], base[:, keep])
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1] = True  # only the second prompt
    with hl.edit(tiny, hl.Patch(head, z=other, positions=mask)):
        got = tiny.run(clean, layers=[0], with_z=True).z(head)
    assert torch.equal(got[1], other[1]) and torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])


def test_patching_all_inputs_equals_patching_the_output(tiny):
    clean, corrupt = _ids(0), _ids(1)
    head = HeadRef(1, 3)
    other = tiny.run(corrupt, layers=[1], with_z=True)
    with hl.edit(tiny, hl.Patch(head, z=other.z(head))):
        want = _logits(tiny, clean)
    with hl.edit(tiny, hl.Patch(head, q=other.q(head), k=other.k(head), v=other.v(head))):
        got = _logits(tiny, clean)
    assert (got - want).abs().max() < 1e-4
    # clean inputs through the override reproduce the clean model
    own = tiny.run(clean, layers=[1])
    with hl.edit(tiny, hl.Patch(head, k=own.k(head))):
        same = _logits(tiny, clean)
    assert (same - _logits(tiny, clean)).abs().max() < 1e-4


def test_patch_bad_inputs(tiny):
    head = HeadRef(0, 0)
    z = torch.zeros(3, 12, tiny.head_dim)
    with pytest.raises(hl.EditError, match="needs values"):
        hl.Patch(head)
    with pytest.raises(hl.EditError, match="not both"):
        hl.Patch(head, z=z, q=z)
    with pytest.raises(hl.EditError, match=r"\[B, T, D\]"):
        hl.Patch(head, z=torch.zeros(12, tiny.head_dim))
    with pytest.raises(hl.HeadIndexError):
        with hl.edit(tiny, hl.Patch(HeadRef(9, 0), z=z)):
            pass
    with pytest.raises(hl.EditError, match="do not fit"), hl.edit(tiny, hl.Patch(head, z=torch.zeros(3, 7, tiny.head_dim))):
        tiny.forward(_ids(0))
    with pytest.raises(hl.EditError, match="two Patch"):
        with hl.edit(tiny, [hl.Patch(head, q=z), hl.Patch(head, k=z)]):
            pass
    with pytest.raises(hl.EditError, match="negative"):
        hl.Patch(head, z=z, positions=[-1])
    before = _logits(tiny, _ids(0))
    with pytest.raises(RuntimeError), hl.edit(tiny, hl.Patch(head, z=z)):
        raise RuntimeError("inside")
    assert torch.equal(_logits(tiny, _ids(0)), before)


def test_resume_from_any_layer_equals_the_full_forward(tiny):
    ids = _ids(2)
    inputs = tiny.layer_inputs(ids)
    end = torch.full((3,), 11)
    tokens = torch.tensor([[5, 6], [7, 8], [9, 10]])
    full = _logits(tiny, ids)[torch.arange(3), end].gather(1, tokens)
    for start in range(tiny.n_layers):
        with torch.no_grad():
            got = inputs.unembed(inputs.resume(start, copies=2), end, tokens)
        assert (got[:3] - full).abs().max() < 1e-4 and (got[3:] - full).abs().max() < 1e-4
    with pytest.raises(hl.HeadIndexError):
        inputs.resume(5)


def _task(model, n=4):
    clean = [_ids(10 + i, (1, 10))[0].tolist() for i in range(n)]
    corrupt = [_ids(50 + i, (1, 10))[0].tolist() for i in range(n)]
    return CircuitBatch(task="random", clean=clean, corrupt=corrupt, answer=torch.tensor([3] * n),
                        wrong=torch.tensor([4] * n), positions={"end": torch.full((n,), 9)}, meta={})


def test_exact_patching_equals_one_forward_per_head(tiny, tmp_path):
    prep = prepare(tiny, _task(tiny))
    scores = exact_patching(tiny, prep, out=tmp_path / "p.jsonl", token_budget=80, progress=False)
    for head in (HeadRef(0, 0), HeadRef(1, 3)):
        with hl.edit(tiny, hl.Patch(head, z=prep.corrupt_run.z(head))):
            logits = _logits(tiny, prep.clean.input_ids)[torch.arange(4), prep.end].gather(1, prep.tokens)
        want = prep.effect(logits[:, 0] - logits[:, 1])
        assert abs(float(scores.maps["effect"][head.layer, head.head]) - float(want)) < 1e-4
    again = exact_patching(tiny, prep, out=tmp_path / "p.jsonl", progress=False)  # resumed: nothing recomputed
    assert torch.equal(again.items["ld"], scores.items["ld"])


def test_prepare_refuses_misaligned_pairs(tiny):
    task = _task(tiny)
    bad = CircuitBatch(task="bad", clean=task.clean, corrupt=[c[:-1] for c in task.corrupt], answer=task.answer,
                       wrong=task.wrong, positions=task.positions, meta={})
    with pytest.raises(PatchingError, match="different token lengths"):
        prepare(tiny, bad)
    wrong_end = CircuitBatch(task="bad", clean=task.clean, corrupt=task.corrupt, answer=task.answer,
                             wrong=task.wrong, positions={"end": torch.full((4,), 5)}, meta={})
    with pytest.raises(PatchingError, match="last token"):
        prepare(tiny, wrong_end)


def test_planted_circuit_exact_and_path_patching_find_exactly_the_wiring(planted):
    prep = prepare(planted, planted_induction_task(16))
    assert float((prep.ld_clean > 0).float().mean()) == 1.0 and abs(float(prep.ld_corrupt.mean())) < 1e-3
    effect = exact_patching(planted, prep, progress=False).maps["effect"]
    assert effect[0, 0] > 0.95 and effect[1, 0] > 0.95
    assert effect[0, 1].abs() < 0.01 and effect[1, 1].abs() < 0.01
    edges = path_patching(planted, prep, planted.heads([0]), planted.heads([1]), progress=False)
    strong = {(str(e.sender), str(e.receiver), e.channel) for e in edges if abs(e.effect) > 0.05}
    assert strong == {("L0H0", "L1H0", "k")}
    assert max(e.effect for e in edges) > 0.95


def test_planted_attribution_patching_gets_the_saturated_previous_token_head_wrong(planted):
    """AtP's known failure, reproduced: L1H0's softmax is saturated, so linearising through its keys gives the
    previous-token head L0H0 an estimate of the wrong sign (exact patching: the full effect, +1). AtP*'s own-softmax
    fix does not reach a downstream softmax; its GradDrop magnitude still flags L0H0 for exact verification, and the
    distractors stay at zero. The direct head L1H0 is estimated well."""
    prep = prepare(planted, planted_induction_task(16))
    plain = atp(planted, prep)
    star = atp_star(planted, prep, progress=False)
    exact = exact_patching(planted, prep, progress=False)
    assert exact.maps["effect"][0, 0] > 0.95
    assert plain.maps["effect"][0, 0] < 0  # the wrong sign
    assert plain.maps["effect"][1, 0] > 0.5
    assert star.maps["atp"].sub(plain.maps["effect"]).abs().max() < 1e-6
    screen = star.maps["screen"]
    assert screen[0, 0] > 0.05 and screen[0, 1] < 1e-3 and screen[1, 1] < 1e-3
    assert agreement(exact, star, k=2, map="screen")["missed"] == []


def test_atp_matches_exact_for_a_small_change(tiny):
    """First order is exact in the limit: with corrupted outputs a small step from the clean ones, AtP ≈ exact."""
    task = _task(tiny)
    prep = prepare(tiny, task)
    for layer in range(tiny.n_layers):  # make the "corrupted" outputs clean + 1e-3 · (corrupt − clean)
        c, x = prep.clean_run.records[layer], prep.corrupt_run.records[layer]
        x.z = c.z + 1e-3 * (x.z - c.z)
    est = atp(tiny, prep).maps["effect"]
    exact = exact_patching(tiny, prep, progress=False).maps["effect"]
    assert torch.allclose(est.detach(), exact, atol=2e-3, rtol=0.05)


def test_reuse_overlap_and_nulls():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 5, generator=g)
    b = a.clone()
    b[0, 0] = 5.0  # one head differs at the top
    c = torch.rand(6, 5, generator=g)
    pairs = overlap({"a": a, "b": b, "c": c}, fractions=(0.2,), draws=2000)
    ab = next(p for p in pairs if (p.a, p.b) == ("a", "b"))
    assert ab.size == 6 and ab.share >= 5 / 6 and ab.sign_agreement == 1.0
    assert ab.null_random["p_value"] < 0.01 and ab.null_random["iou_mean"] < 0.2
    assert top_heads(a, 0.2) == {HeadRef(i // 5, i % 5) for i in a.flatten().topk(6).indices.tolist()}
    with pytest.raises(ValueError):
        overlap({"a": a})


def test_discover_and_compare_save_and_reload(planted, tmp_path):
    params = DiscoverParams(n=8, fraction=0.5, edge_prompts=8)
    task = planted_induction_task(8)
    circuit = discover(planted, task, params=params, out=tmp_path / "one", progress=False)
    assert circuit.head_set == {HeadRef(0, 0), HeadRef(1, 0)}
    roles = {str(h.head): h.role for h in circuit.heads}
    assert roles["L1H0"] == "mover"  # all of its effect is direct
    assert roles["L0H0"] == "previous-token"
    again = Circuit.load(tmp_path / "one")
    assert again.to_json() == circuit.to_json()
    import dataclasses

    other = dataclasses.replace(planted_induction_task(8, seed=1), task="planted_copy")
    discover(planted, other, params=params, out=tmp_path / "two", progress=False)
    comparison = compare([tmp_path / "one", tmp_path / "two"], fractions=(0.5,), draws=500, out=tmp_path / "cmp")
    assert comparison.pairs[0].iou == 1.0
    assert load_comparison(tmp_path / "cmp").to_json() == comparison.to_json()
    fig = circuit.figure()
    assert len(fig.data) >= 2


def test_attend_makes_the_chosen_rows_uniform_over_the_chosen_keys(tiny):
    ids = _ids(3)
    head = HeadRef(1, 1)
    keys = torch.zeros(3, 12, dtype=torch.bool)
    keys[:, [1, 4, 6]] = True
    queries = torch.zeros(3, 12, dtype=torch.bool)
    queries[:, 11] = True
    base = tiny.run(ids, layers=[1], with_z=True)
    with hl.edit(tiny, hl.edits.Attend(head, keys=keys, queries=queries)):
        got = tiny.run(ids, layers=[1], with_z=True)
    v = base.v(head)  # [B, S, D]
    want = v[:, [1, 4, 6]].mean(1)
    assert (got.z(head)[:, 11] - want).abs().max() < 1e-5
    assert (got.z(head)[:, :11] - base.z(head)[:, :11]).abs().max() < 1e-5
    with pytest.raises(hl.EditError, match="bool"):
        hl.edits.Attend(head, keys=torch.zeros(3, 12))


def test_repair_on_the_planted_model_reports_before_after_and_control(planted):
    from headlab.circuits.repair import RepairResult, repair

    task = planted_induction_task(12)
    # attend the induction head at the end to the answer position itself: top-1 stays right; to "first" (the
    # earlier occurrence of the last token): it copies that token instead, so accuracy drops
    broken = repair(planted, task, [HeadRef(1, 0)], wrong_positions=["first"])
    assert broken.accuracy["before"]["top1"]["accuracy"] == 1.0
    assert broken.accuracy["after"]["top1"]["accuracy"] == 0.0
    assert broken.delta["after"]["top1"]["ci95"][1] < 0
    assert broken.control_heads == ["L1H1"] and broken.accuracy["control"]["top1"]["accuracy"] == 1.0


def test_exact_patching_with_prompts_of_different_lengths(tiny):
    """Prompts of each length run as their own unpadded bucket; the result equals patching the padded batch."""
    lengths = [8, 10, 10, 12]
    clean = [_ids(70 + i, (1, t))[0].tolist() for i, t in enumerate(lengths)]
    corrupt = [_ids(90 + i, (1, t))[0].tolist() for i, t in enumerate(lengths)]
    task = CircuitBatch(task="ragged", clean=clean, corrupt=corrupt, answer=torch.tensor([3, 5, 7, 9]),
                        wrong=torch.tensor([4, 6, 8, 10]), positions={"end": torch.tensor(lengths) - 1}, meta={})
    prep = prepare(tiny, task)
    assert [b.length for b in prep.buckets] == [8, 10, 12]
    scores = exact_patching(tiny, prep, progress=False)
    rows = torch.arange(4)
    for head in tiny.heads():
        with hl.edit(tiny, hl.Patch(head, z=prep.corrupt_run.z(head))), torch.no_grad():
            logits = tiny.hf(input_ids=prep.clean.input_ids, attention_mask=prep.clean.attention_mask).logits
        picked = logits[rows, prep.end].gather(1, prep.tokens)
        assert (scores.items["ld"][head.layer, head.head] - (picked[:, 0] - picked[:, 1])).abs().max() < 1e-4


def test_cli_compare_and_repair_name_bad_folders(tmp_path, capsys, planted):
    from headlab.cli import main

    assert main(["circuit", "compare", str(tmp_path / "missing"), str(tmp_path / "missing2"),
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "circuit.json" in capsys.readouterr().err
    params = DiscoverParams(n=8, fraction=0.5, edge_prompts=8)
    discover(planted, planted_induction_task(8), params=params, out=tmp_path / "one", progress=False)
    assert main(["circuit", "compare", str(tmp_path / "one"), str(tmp_path / "one"), "--out",
                 str(tmp_path / "cmp")]) == 2
    assert "the same task twice" in capsys.readouterr().err
    assert main(["circuit", "repair", "--circuit", str(tmp_path / "one"), "--roles", "inhibition",
                 "--out", str(tmp_path / "rep")]) == 2
    assert "has no heads with roles" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["circuit", "discover", "--task", "no-such-task", "--out", str(tmp_path / "x")])


def test_add_edit_and_its_nesting_order(tiny):
    ids = _ids(4)
    head = HeadRef(1, 0)
    base = tiny.run(ids, layers=[1], with_z=True).z(head)
    delta = torch.randn(tiny.head_dim, generator=torch.Generator().manual_seed(0))
    other = tiny.run(_ids(5), layers=[1], with_z=True).z(head)

    def z_with(*scopes):
        from contextlib import ExitStack

        with ExitStack() as stack:
            for edits in scopes:
                stack.enter_context(hl.edit(tiny, edits))
            return tiny.run(ids, layers=[1], with_z=True).z(head)

    assert torch.allclose(z_with(hl.edits.Add(head, delta=delta)), base + delta, atol=1e-6)
    assert torch.allclose(z_with(hl.Patch(head, z=other), hl.edits.Add(head, delta=delta)), other + delta, atol=1e-6)
    assert torch.allclose(z_with(hl.edits.Add(head, delta=delta), hl.Scale(head, factor=2.0)), 2 * (base + delta),
                          atol=1e-5)
    assert torch.allclose(z_with(hl.edits.Add(head, delta=delta), hl.Patch(head, z=other)), other, atol=1e-6)
    with pytest.raises(hl.EditError, match="not finite"):
        hl.edits.Add(head, delta=torch.full((tiny.head_dim,), float("nan")))
    with pytest.raises(hl.EditError, match="head dim"):
        with hl.edit(tiny, hl.edits.Add(head, delta=torch.zeros(3))):
            pass
