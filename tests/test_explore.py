"""The head explorer's logic without a browser: prompt scores, inputs, edits, caching, session isolation."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
import transformers as T

import headlab as hl
from headlab.analyses.prompt_scores import induction_targets, pattern_scores, prompt_scores
from headlab.capture import active_ops
from headlab.explore import (
    Explorer, ExplorerSettings, ModelCache, add_head, comparison_md, example_prompt, load_app_module, make_edits,
    parse_heads, parse_prompt, top_predictions,
)

WORDS = ["<bos>", "<unk>"] + "the cat sat on mat dog ran in park a . , and".split()
PROMPT = "the cat sat on the mat . the dog ran in the park . the cat sat on the"


def make_text_model(folder):
    """A tiny random 2-layer × 4-head GPT-2 with a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                          bos_token_id=0, eos_token_id=0)
    T.GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(make_text_model(tmp_path_factory.mktemp("tiny_text")))


@pytest.fixture(scope="module")
def explorer():
    return Explorer(ExplorerSettings(max_tokens=400, top_k=5, window=16, allow_folders=True))


@pytest.fixture(scope="module")
def session(explorer, folder):
    return explorer.analyse(folder, PROMPT, True, "induction")[3]


def test_pattern_scores_on_planted_patterns():
    ids = torch.tensor([0, 5, 6, 7, 5, 6, 7])
    t = len(ids)
    prev = torch.zeros(t, t)
    prev[0, 0] = 1
    prev[torch.arange(1, t), torch.arange(0, t - 1)] = 1
    induction = prev.clone()
    for i, j in [(4, 2), (5, 3), (6, 4)]:  # query i attends to the token after the earlier occurrence of ids[i]
        induction[i] = 0
        induction[i, j] = 1
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    scores = pattern_scores(torch.stack([prev, induction, uniform]), ids)
    assert scores["prev_token"][:2].tolist() == pytest.approx([1.0, 0.4])
    assert scores["first_token"][0] == pytest.approx(1 / 6)
    assert scores["induction"].tolist()[:2] == [0.0, 1.0]
    assert scores["entropy"][0] == 0 and scores["entropy"][2] == pytest.approx(
        sum(math.log(i) for i in range(1, t + 1)) / t)
    assert induction_targets(ids)[4].nonzero().flatten().tolist() == [2]
    assert torch.isnan(pattern_scores(uniform[None], torch.arange(t))["induction"]).all()  # nothing repeats


def test_prompt_scores_match_the_run_patterns(folder):
    model = hl.load(folder, device="cpu")
    scores = prompt_scores(model, PROMPT)
    run = model.run(PROMPT)
    ids = run.batch.input_ids[0]
    for layer in range(model.n_layers):
        expected = pattern_scores(run.patterns(layer)[0], ids)
        for key, value in expected.items():
            assert torch.allclose(scores.maps[key][layer], value, atol=1e-6), key
    assert scores.items["next_logits"].shape == (len(WORDS),)
    assert scores.items["token_losses"].mean().item() == pytest.approx(model.loss(PROMPT).item(), abs=1e-6)


def test_bad_inputs_get_clear_messages(explorer, folder, tiny_folder):
    model = explorer.cache.get(folder)
    with pytest.raises(hl.PromptError, match="empty prompt"):
        parse_prompt(model, "   ", prepend_bos=True, max_tokens=10)
    with pytest.raises(hl.PromptError, match="cap of 10 tokens"):
        parse_prompt(model, "the cat " * 20, prepend_bos=True, max_tokens=10)
    with pytest.raises(hl.PromptError, match="far above the cap"):
        parse_prompt(model, "x" * 100_000, prepend_bos=True, max_tokens=10)
    with pytest.raises(hl.HeadIndexError, match="L<layer>H<head>"):
        parse_heads(model, "head one")
    with pytest.raises(hl.HeadIndexError, match="out of range"):
        parse_heads(model, "L1H0, L7H1")
    with pytest.raises(hl.EditError, match="at least one head"):
        parse_heads(model, " , ")
    with pytest.raises(hl.EditError, match="finite factor"):
        make_edits(model, [hl.HeadRef(0, 0)], "scale", None, model.encode(PROMPT))
    with pytest.raises(hl.ModelNotFoundError, match="unknown model 'no-such-model'"):
        explorer.analyse("no-such-model", PROMPT, True, "induction")
    with pytest.raises(hl.ModelNotFoundError, match="choose a model"):
        explorer.cache.get(" ")
    with pytest.raises(hl.PromptError, match="nothing analysed yet"):
        explorer.apply_edit(None, "L0H0", "zero", None)
    ids_model = hl.load(tiny_folder("gpt2"), device="cpu")  # no tokenizer: token ids only
    with pytest.raises(hl.PromptError, match="no tokenizer: type token ids"):
        parse_prompt(ids_model, "the cat", prepend_bos=False, max_tokens=10)
    assert parse_prompt(ids_model, "0 5, 7 5", prepend_bos=True, max_tokens=10).input_ids.tolist() == [[0, 5, 7, 5]]
    assert add_head("L0H1, l1h2", "L1H2") == "L0H1, l1h2" and add_head("", "L1H3") == "L1H3"


def test_a_pickle_only_folder_is_refused(explorer, tmp_path, folder):
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(hl.ModelNotFoundError, match="found only pytorch_model.bin.*never unpickles"):
        explorer.cache.get(str(tmp_path))


def test_models_load_once_per_process(folder):
    calls = []

    def loader(name):
        calls.append(name)
        return hl.load(name, device="cpu")

    cache = ModelCache(loader)
    threads = [threading.Thread(target=cache.get, args=(folder,)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == [folder] and cache.get(folder + "/") is cache.get(folder)


def test_analyse_head_view_and_edit(explorer, folder, session):
    model = explorer.cache.get(folder)
    assert session.ids[0] == model.bos_id and set(session.maps) == {"prev_token", "induction", "first_token",
                                                                     "entropy"}
    assert explorer.best_head(session, "entropy") == str(min(model.heads(), key=lambda h: float(
        session.maps["entropy"][h.layer, h.head])))
    status, fig, info = explorer.head_view(session, "L1H2", None, 8)
    n = session.n_tokens
    assert list(fig.data[0].x) == list(range(n - 8, n)) and "**L1H2**" in info and f"{n - 1}:" in info
    _, body = explorer.apply_edit(session, "L1H2, L0H1", "zero", None)
    with hl.edit(model, hl.ablate(["L1H2", "L0H1"])):
        edited = model.loss(list(session.ids)).item()
    assert f"edited **{edited:.4f}**" in body and f"original **{session.loss:.4f}**" in body
    for how, factor in [("mean", None), ("uniform", None), ("scale", 2.0)]:
        assert "edited **" in explorer.apply_edit(session, "L1H2", how, factor)[1]
    assert active_ops(model.owner) == {} and model.loss(list(session.ids)).item() == pytest.approx(session.loss)


def test_open_model_keeps_a_readable_prompt_and_shows_a_head(explorer, folder, tiny_folder):
    status, prompt, _, _, session, head, pattern, _, comparison = explorer.open_model(
        folder, PROMPT, True, "induction", -1, 8)
    assert prompt == PROMPT and f"showing {head}" in status and comparison == ""
    assert head == explorer.best_head(session, "induction") and pattern.layout.title.text.startswith(head)
    ids_only = str(tiny_folder("gpt2"))
    status, prompt, *_ = explorer.open_model(ids_only, PROMPT, True, "prev_token", None, 8)
    assert prompt == example_prompt(explorer.cache.get(ids_only)) and "Loaded" in status
    assert explorer.select_head("L0H1", "L1H3") == ("Heads to edit: L0H1, L1H3.", "L0H1, L1H3")


def test_long_prompts_show_a_window(explorer, folder):
    words = WORDS[2:] * 40
    _, _, _, long = explorer.analyse(folder, " ".join(words[:380]), True, "prev_token")
    assert long.n_tokens == 381
    _, fig, _ = explorer.head_view(long, "L0H0", 100, 32)
    assert len(fig.data[0].z) == 32 and fig.data[0].x[0] == 100
    with pytest.raises(hl.PromptError, match="cap of 400"):
        explorer.analyse(folder, " ".join(words[:420]), True, "prev_token")


def test_head_views_agree_with_and_without_cached_records(folder):
    explorer = Explorer(ExplorerSettings(cached_prompts=1, allow_folders=True))
    first = explorer.analyse(folder, PROMPT, True, "induction")[3]
    cached = explorer.head_view(first, "L1H1", 3, 10)[1]
    explorer.analyse(folder, "the dog ran", True, "induction")  # evicts the first prompt's records
    assert explorer.records.get((explorer.cache.get(folder).owner, first.ids)) is None
    rerun = explorer.head_view(first, "L1H1", 3, 10)[1]
    assert torch.allclose(torch.tensor(cached.data[0].z), torch.tensor(rerun.data[0].z), atol=1e-6)


def test_encoders_show_scores_but_refuse_edits(explorer, tiny_folder):
    name = str(tiny_folder("bert"))
    status, _, preds, session = explorer.analyse(name, "5 6 7 5 6 7", False, "first_token")
    assert "no LM head" in preds and session.n_tokens == 6
    with pytest.raises(hl.EditError, match="no LM head"):
        explorer.apply_edit(session, "L0H0", "zero", None)


def leaked_body(explorer, session):
    """What session A ("zero L1H0") would show if session B's edit ("scale ×3 L0H2") leaked into it."""
    model = explorer.cache.get(session.model)
    with hl.edit(model, [hl.Ablate(hl.HeadRef(1, 0)), hl.Scale(hl.HeadRef(0, 2), factor=3.0)]):
        logits = model.hf(torch.tensor([session.ids])).logits[0].detach()
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(session.ids[1:])).item()
    top = top_predictions(model, logits[-1], explorer.settings.top_k)
    return comparison_md(session.top, top, session.loss, loss, "zero L1H0")


def test_concurrent_sessions_never_see_each_others_edits(explorer, folder, session):
    """Three sessions in three threads, held mid-forward together by a barrier: A ablates, B scales, C analyses."""
    model = explorer.cache.get(folder)
    jobs = {"A": lambda: explorer.apply_edit(session, "L1H0", "zero", None)[1],
            "B": lambda: explorer.apply_edit(session, "L0H2", "scale", 3.0)[1],
            "C": lambda: explorer.analyse(folder, PROMPT, True, "induction")[2]}
    expected = {key: job() for key, job in jobs.items()}
    assert len({*expected.values(), leaked_body(explorer, session)}) == 4  # a leak would show
    barrier = threading.Barrier(3, timeout=60)

    def hold(*_):
        barrier.wait()  # every session is now inside its forward, A and B inside their edit scopes

    handle = model.attention_module(1).register_forward_pre_hook(hold)
    got, errors = {}, []

    def work(key):
        try:
            got[key] = jobs[key]()
        except Exception as err:  # reported below: a thread's exception would otherwise vanish
            errors.append(err)

    try:
        for _ in range(3):
            threads = [threading.Thread(target=work, args=(key,)) for key in jobs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert not errors and got == expected
    finally:
        handle.remove()
    assert active_ops(model.owner) == {} and model.loss(list(session.ids)).item() == pytest.approx(session.loss)


def test_cli_registration_defaults_to_localhost():
    from headlab.cli import build_parser

    args = build_parser().parse_args(["explore", "--model", "toy-induction"])
    assert (args.model, args.host, args.port, args.max_tokens) == ("toy-induction", "127.0.0.1", 7860, 2048)
    assert args.handler.__name__ == "cmd_explore"


def test_app_builds_with_safe_defaults(explorer, folder):
    pytest.importorskip("gradio")
    app = load_app_module()
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    demo = app.build_app(explorer, model=folder)
    assert demo.analytics_enabled is False
    outputs = app.guarded(lambda: explorer.analyse(folder, "", True, "induction"), 3)()
    assert outputs[0].startswith("⚠️ empty prompt") and len(outputs) == 3


def test_clients_load_only_served_models_and_the_cache_is_bounded(folder, tmp_path):
    """By default a client cannot make the server load an arbitrary folder; at most max_models stay loaded."""
    other = str(make_text_model(tmp_path / "other"))
    locked = Explorer(ExplorerSettings(allowed=(folder,)))
    assert locked.cache.get(folder).n_layers == 2  # the launch --model is served
    with pytest.raises(hl.ModelNotFoundError, match="--allow-folders"):
        locked.cache.get(other)
    loads = []

    def loader(name):
        loads.append(name)
        return hl.load(name, device="cpu")

    cache = ModelCache(loader, max_models=1)
    cache.get(folder)
    cache.get(other)
    assert len(cache.loaded()) == 1 and cache.loaded()[0].endswith("other")
    cache.get(folder)  # evicted before: loaded again
    assert len(loads) == 3


def test_explore_command_warns_beyond_loopback(monkeypatch, capsys):
    from headlab.cli import build_parser
    from headlab.cli import explore as explore_cli

    served = {}

    class App:
        @staticmethod
        def build_app(explorer, model, circuit=None, reports=None):
            served["settings"], served["reports"] = explorer.settings, reports
            return None

        @staticmethod
        def launch(demo, host, port, block):
            served["host"] = host

    monkeypatch.setattr("headlab.explore.load_app_module", lambda: App)
    monkeypatch.setattr("headlab.explore.Explorer.open_model", lambda self, *a: None)
    args = build_parser().parse_args(["explore", "--model", "toy-induction", "--host", "0.0.0.0"])
    assert explore_cli.cmd_explore(args) == 0
    assert "beyond this machine" in capsys.readouterr().err and served["host"] == "0.0.0.0"
    assert served["settings"].allowed == ("toy-induction",) and not served["settings"].allow_folders
    assert served["reports"].opened == [] and not served["reports"].allow_folders  # no --report: none opened
    args = build_parser().parse_args(["explore", "--model", "toy-induction"])
    explore_cli.cmd_explore(args)
    assert "beyond" not in capsys.readouterr().err


def test_moh_tab_routes_the_prompt_and_compares_predictions(explorer, folder, session):
    model = explorer.cache.get(folder)
    status, fig, body = explorer.moh_view(session, 0.5, 1, True)
    assert "layer 1" in status
    gates = torch.tensor(fig.data[0].z)  # [H, T] for layer 1
    assert gates.shape == (model.n_heads, session.n_tokens)
    assert torch.all(gates[:2] == 1) and torch.all(gates[2:].sum(0) == 1)  # 2 shared, 1 of 2 routed per token
    with hl.edit(model, hl.MoH(active=0.5)):
        edited = model.loss(list(session.ids)).item()
    assert f"edited **{edited:.4f}**" in body and "75.0% of (token, head) pairs" in body
    _, _, off = explorer.moh_view(session, 0.5, 1, False)
    assert f"edited **{session.loss:.4f}**" in off
    assert active_ops(model.owner) == {}
    with pytest.raises(hl.EditError, match="active share"):
        explorer.moh_view(session, 1.5, 0, True)
    with pytest.raises(hl.HeadIndexError):
        explorer.moh_view(session, 0.5, 9, True)
