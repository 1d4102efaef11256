"""MQAR (multi-query associative recall) and the position options of headlab's linear-attention LMs.

The generator (`headlab.inputs.mqar`), `HeadlabLinearConfig.position` ("learned" / "none" / "rotary"), the MQAR
twins' recipe and trainer, and the committed data/mqar-twins summary (re-evaluated on one model).
"""

from __future__ import annotations

import json

import pytest
import torch

from headlab.inputs import mqar
from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM
from headlab.models.linear import train as twins
from headlab.models.linear.modeling import apply_rotary, causal_masks
from headlab.models.linear.mqar_twins import mqar_summary_markdown, mqar_twin_name, train_mqar_twins
from headlab.models.linear.train import MQAR, TwinParams, evaluate_mqar, same_recipe
from headlab.paths import MOH_TWINS_DIR, MQAR_TWINS_DIR, TWINS_DIR

# ----------------------------------------------------------------------------------------------- the generator


def _check_rows(ids, answers, pairs, vocab, *, once=True):
    half = vocab // 2
    for row, ans in zip(ids.tolist(), answers.tolist()):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        value_of = dict(zip(keys, values))
        assert not any(ans[:2 * pairs])  # nothing to answer in the context
        asked = []
        for t in range(2 * pairs, len(row)):
            if ans[t]:
                assert row[t - 1] in value_of and row[t] == value_of[row[t - 1]]
                asked.append(row[t - 1])
                assert (t - 2 * pairs) % 2 == 1  # each query's key sits at an even offset of the query region
            elif t == len(row) - 1 or not ans[t + 1]:
                assert row[t] == 0  # filler
        if once:
            assert sorted(asked) == sorted(keys)  # every key queried exactly once
    return True


def test_mqar_answers_are_the_values_of_their_keys():
    ids, answers = mqar(16, 96, 12, 64, seed=3)
    assert ids.shape == answers.shape == (16, 96) and answers.dtype == torch.bool
    assert (answers.sum(1) == 12).all()
    assert _check_rows(ids, answers, 12, 64)


def test_mqar_dense_repeated_queries_and_power_law_placement():
    ids, answers = mqar(8, 64, 8, 32, num_queries=24, repeat=True, seed=0)  # every slot of the query region
    assert (answers.sum(1) == 24).all() and (ids[:, 16:] != 0).all()
    assert _check_rows(ids, answers, 8, 32, once=False)
    # Zoology's power law puts the queries closer to the context than uniform placement does
    _, near = mqar(256, 512, 8, 64, seed=1, power_a=0.01)
    _, flat = mqar(256, 512, 8, 64, seed=1)
    pos = torch.arange(512).float()
    assert (pos * near).sum() / near.sum() < 0.6 * (pos * flat).sum() / flat.sum()


def test_mqar_is_seeded():
    a = mqar(4, 64, 8, 64, seed=7)
    b = mqar(4, 64, 8, 64, seed=7)
    c = mqar(4, 64, 8, 64, generator=torch.Generator().manual_seed(7))
    d = mqar(4, 64, 8, 64, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], d[0])
    assert torch.equal(mqar(2, 32, 4, 16)[0], mqar(2, 32, 4, 16, seed=0)[0])  # default seed 0


@pytest.mark.parametrize("args, kwargs, match", [
    ((1, 256, 32, 64), {}, "distinct keys"),  # 31 keys in a vocabulary of 64
    ((1, 256, 4, 6), {}, "distinct keys"),
    ((1, 40, 16, 64), {}, "too short"),  # 16 pairs + 16 queries need 64 tokens
    ((1, 64, 8, 64), {"num_queries": 25, "repeat": True}, "too short"),
    ((1, 64, 8, 64), {"num_queries": 9}, "queried at most once"),
    ((1, 64, 8, 64), {"seed": 1, "generator": torch.Generator()}, "not both"),
    ((1, 64, 8, 64), {"power_a": 0.0}, "power_a"),
    ((1, 64, 8, 64), {"filler": 64}, "filler"),
    ((0, 64, 8, 64), {}, ">= 1"),
])
def test_mqar_refuses_impossible_settings(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqar(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- positions


def tiny(kinds, position, *, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HeadlabLinearConfig(vocab_size=40, hidden_size=32, num_hidden_layers=len(kinds), num_attention_heads=2,
                              layer_kinds=list(kinds), window=5, based_feature_dim=4, position=position, **kw)
    model = HeadlabLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.4)
    return model


def test_position_option_is_validated_and_defaults_to_learned():
    assert HeadlabLinearConfig().position == "learned" and HeadlabLinearConfig().max_position_embeddings == 512
    assert HeadlabLinearConfig(position="none").max_position_embeddings is None
    with pytest.raises(ValueError, match="unknown position"):
        HeadlabLinearConfig(position="alibi")
    with pytest.raises(ValueError, match="even"):
        HeadlabLinearConfig(hidden_size=30, num_attention_heads=2, layer_kinds="softmax", position="rotary")
    HeadlabLinearConfig(hidden_size=30, num_attention_heads=2, layer_kinds="gla", position="rotary")  # nothing rotated


STACKS = [["softmax", "softmax"], ["swa", "based"], ["linear"], ["hedgehog"], ["gla"], ["deltanet"],
          ["swa", "deltanet", "softmax"]]


@pytest.mark.parametrize("position", ["none", "rotary"])
@pytest.mark.parametrize("kinds", STACKS, ids=["+".join(k) for k in STACKS])
def test_none_and_rotary_models_run_past_max_position_embeddings(kinds, position):
    model = tiny(kinds, position, max_position_embeddings=16)  # informational only
    assert model.model.embed_positions is None
    ids = torch.randint(0, 40, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 70, 40) and torch.isfinite(out.loss)
    # causal: the first 30 positions do not depend on what follows
    with torch.no_grad():
        head = model(input_ids=ids[:, :30]).logits
    torch.testing.assert_close(head, out.logits[:, :30], atol=2e-5, rtol=1e-4)


def test_learned_positions_keep_their_limit():
    model = tiny(["softmax"], "learned", max_position_embeddings=16)
    assert model.model.embed_positions.num_embeddings == 16
    model(input_ids=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="learned positions"):
        model(input_ids=torch.zeros(1, 17, dtype=torch.long))


def test_rotary_is_relative_shifting_every_position_leaves_the_softmax_pattern_unchanged():
    model = tiny(["softmax"], "rotary")
    model.set_attn_implementation("eager")
    attn = model.model.layers[0].attn
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    mask = causal_masks(None, 2, 12, 5, x.device)[0]
    with torch.no_grad():
        out0, w0 = attn(x, attention_mask=mask)  # positions 0..11
        out1, w1 = attn(x, attention_mask=mask, position_ids=torch.arange(12) + 1000)
        out2, w2 = attn(x, attention_mask=mask, position_ids=torch.arange(12)[None].repeat(2, 1) + 37)
        _, w_far = attn(x, attention_mask=mask, position_ids=torch.arange(12) * 3)  # not a shift: another pattern
    torch.testing.assert_close(w1, w0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w2, w0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-4)
    assert (w_far - w0).abs().max() > 1e-3
    # the rotation itself: (R_i q)·(R_j k) depends on i − j only, and norms are kept
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dot = lambda i, j: (apply_rotary(q, torch.tensor([i])) * apply_rotary(k, torch.tensor([j]))).sum()  # noqa: E731
    torch.testing.assert_close(dot(5, 2), dot(105, 102), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(apply_rotary(q, torch.tensor([9])).norm(), q.norm())


def test_rotary_turns_softmax_layers_only():
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for kinds in (["gla", "deltanet"], ["linear", "hedgehog", "based"]):  # rotary on a linear stack == none
            torch.testing.assert_close(tiny(kinds, "rotary")(input_ids=ids).logits,
                                       tiny(kinds, "none")(input_ids=ids).logits, atol=0, rtol=0)
        for kinds in (["softmax"], ["swa", "gla"]):
            diff = tiny(kinds, "rotary")(input_ids=ids).logits - tiny(kinds, "none")(input_ids=ids).logits
            assert diff.abs().max() > 1e-3


def test_rotary_model_saves_and_loads(tmp_path):
    model = tiny(["swa", "based"], "rotary", rope_theta=500.0)
    model.save_pretrained(tmp_path)
    again = HeadlabLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.position == "rotary" and again.config.rope_theta == 500.0
    ids = torch.randint(0, 40, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["recall-softmax", "recall-based", "text-gla"])
def test_saved_twins_still_load_with_learned_positions(name):
    folder = TWINS_DIR / name
    assert "position" not in json.loads((folder / "config.json").read_text())  # saved before the option existed
    model, info = HeadlabLinearForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.position == "learned"
    n = model.config.max_position_embeddings
    assert model.model.embed_positions.num_embeddings == n
    with pytest.raises(ValueError, match="learned positions"):
        model(input_ids=torch.zeros(1, n + 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- MQAR twins


def test_mqar_recipe():
    assert {k: TwinParams.for_task(MQAR, k).position for k in ("softmax", "based", "linear", "gla", "deltanet")} == {
        "softmax": "rotary", "based": "rotary", "linear": "none", "gla": "none", "deltanet": "none"}
    p = TwinParams.for_task(MQAR, "gla")
    cfg = p.config()
    assert cfg.position == "none" and cfg.max_position_embeddings is None and cfg.vocab_size == p.mqar_vocab
    assert p.seq_len == 256 and p.train_queries == (256 - 2 * p.mqar_pairs) // 4  # half the query slots
    with pytest.raises(ValueError, match="distinct keys"):
        TwinParams.for_task(MQAR, "gla", mqar_pairs=40)
    with pytest.raises(ValueError, match="too short"):
        TwinParams.for_task(MQAR, "gla", seq_len=20)
    with pytest.raises(ValueError, match="unknown task"):
        TwinParams.for_task("mqar2", "gla")
    # a recall twin's config is what it was before the position option
    saved = json.loads((TWINS_DIR / "recall-gla" / "config.json").read_text())
    assert TwinParams.for_task("recall", "gla").config().max_position_embeddings == saved["max_position_embeddings"]


def test_older_run_records_still_match_their_recipe():
    run = json.loads((MOH_TWINS_DIR / "text-mha" / "run.json").read_text())
    assert "position" not in run["params"]
    params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
    assert same_recipe(run["params"], params)
    assert not same_recipe(run["params"], TwinParams(**{**params.__dict__, "position": "rotary"}))


def test_train_mqar_twins_writes_resumes_and_refuses_another_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(twins, "MQAR_EVAL_LENGTHS", (64, 128))
    kw = dict(kinds=("deltanet", "softmax"), hiddens=(16,), steps=2, seq_len=64, mqar_pairs=4, batch=4,
              progress=False)
    summary = train_mqar_twins(tmp_path, **kw)
    assert set(summary["models"]) == {"deltanet-h16", "softmax-h16"}
    m = summary["models"]["deltanet-h16"]
    assert m["position"] == "none" and m["state_per_head"] == 4 * 4 and set(m["accuracy"]) == {"64", "128"}
    assert summary["models"]["softmax-h16"]["kv_cache_per_token_per_head"] == 2 * 4
    assert json.loads((tmp_path / "summary.json").read_text())["table"] == summary["table"]
    assert "| deltanet-h16 |" in (tmp_path / "README.md").read_text()

    def boom(*args, **kwargs):
        raise AssertionError("a finished model was retrained")

    monkeypatch.setattr(twins, "train_twin", boom)
    assert train_mqar_twins(tmp_path, **kw)["table"] == summary["table"]
    with pytest.raises(ValueError, match="another recipe"):
        train_mqar_twins(tmp_path, **{**kw, "lr": 1e-2})


def test_mqar_twins_with_a_short_convolution(tmp_path, monkeypatch):
    """short_conv=K names the models <kind>-conv<K>-h<width>, beside the no-conv ones of the same folder, and the
    summary keeps the convolution per model (not in the shared recipe) with the state it adds."""
    monkeypatch.setattr(twins, "MQAR_EVAL_LENGTHS", (64,))
    kw = dict(kinds=("gla", "based"), hiddens=(16,), steps=2, seq_len=64, mqar_pairs=4, batch=4, progress=False)
    train_mqar_twins(tmp_path, **kw)
    summary = train_mqar_twins(tmp_path, **kw, short_conv=3)
    assert set(summary["models"]) == {"gla-h16", "based-h16", "gla-conv3-h16", "based-conv3-h16"}
    conv, plain = summary["models"]["gla-conv3-h16"], summary["models"]["gla-h16"]
    # per head: the last 2 inputs of q, k (4 each) and v (4)
    assert conv["short_conv"] == 3 and conv["conv_state_per_head"] == 2 * (4 + 4 + 4)
    assert plain["short_conv"] == 0 and plain["conv_state_per_head"] == 0 and "short_conv" not in summary["recipe"]
    assert conv["n_params"] - plain["n_params"] == 2 * 3 * (16 + 16 + 16)  # 2 layers × K × (q, k, v channels)
    assert json.loads((tmp_path / "gla-conv3-h16" / "config.json").read_text())["short_conv"] == 3
    assert "short convolution: a causal depthwise Conv1d of kernel 3" in (tmp_path / "gla-conv3-h16" / "README.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "| gla-conv3-h16 | gla | 3 | 16 | gla+gla | none |" in readme and "| 16 + 24 conv |" in readme
    assert "| gla-h16 | gla | — | 16 |" in readme
    assert readme.index("| gla-h16 |") < readme.index("| gla-conv3-h16 |")  # the no-conv rows first
    assert mqar_summary_markdown(summary) == readme
    assert mqar_twin_name("gla", 16, 3) == "gla-conv3-h16" and mqar_twin_name("gla", 16) == "gla-h16"
    assert twins.train_mqar_twins is train_mqar_twins  # the old import path still works


def test_committed_mqar_summary_is_reproduced():
    summary = json.loads((MQAR_TWINS_DIR / "summary.json").read_text())
    assert summary["task"] == MQAR and summary["eval"]["lengths"] == [256, 512, 1024, 2048]
    kinds = ("softmax", "linear", "hedgehog", "based", "gla", "deltanet")
    assert {f"{k}-h64" for k in kinds} | {f"{k}-conv4-h64" for k in kinds} <= set(summary["models"])
    assert any(m["hidden"] == 128 and m["short_conv"] == 4 for m in summary["models"].values())
    for name, m in summary["models"].items():
        folder = MQAR_TWINS_DIR / name
        assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
        run = json.loads((folder / "run.json").read_text())
        assert {k: v["accuracy"] for k, v in run["eval"]["lengths"].items()} == m["accuracy"]
        config = json.loads((folder / "config.json").read_text())
        assert config.get("short_conv", 0) == m["short_conv"] == run["params"].get("short_conv", 0)
        assert name == f"{m['kind']}-conv4-h{m['hidden']}" if m["short_conv"] else name == f"{m['kind']}-h{m['hidden']}"
    # re-evaluate one committed model at one length, with and without a convolution
    for name in ("based-h64", "deltanet-conv4-h64"):
        _reevaluate(summary, name)


def _reevaluate(summary, name):
    run = json.loads((MQAR_TWINS_DIR / name / "run.json").read_text())
    params = TwinParams(**{**run["params"], "period_range": tuple(run["params"]["period_range"])})
    model = HeadlabLinearForCausalLM.from_pretrained(MQAR_TWINS_DIR / name)
    assert model.config.position == params.position and model.model.embed_positions is None
    ev = evaluate_mqar(model, params, lengths=(512,))
    assert abs(ev["lengths"]["512"]["accuracy"] - summary["models"][name]["accuracy"]["512"]) <= 1e-6
