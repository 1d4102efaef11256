"""Saved reports in the explorer, without a browser: every kind of folder a headlab command writes opens (built here by
the real commands on tiny models), its top heads are the result's own maxima, broken folders get named errors, the
Pruning tab's masks are the prune experiment's, and the ICL tab's step slider picks the saved checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

import headlab as hl
from headlab.cli import main
from headlab.explore import Explorer, ExplorerSettings, Session
from headlab.explore.icl import icl_open, icl_view
from headlab.explore.pruning import apply, prune_view, remeasure
from headlab.explore.reports import KINDS, ReportError, ReportLibrary, detect, find_reports, open_report
from headlab.errors import EditError
from headlab.paths import TWINS_DIR
from headlab.results import HeadScores
from test_explore import PROMPT, make_text_model

CTX = 16


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def _calibration(folder: Path) -> None:
    """`headlab calibrate`'s writes (calibration_search, then scores.save) on the planted sink model's token items."""
    from headlab.analyses.calibration import CalibrationParams, calibration_search
    from headlab.analyses.sinks import SinkRule
    from test_sinks_calibration import _amplified, _items

    torch.manual_seed(0)
    model = _amplified()
    params = CalibrationParams(beta=0.0, rule=SinkRule(min_visible=4), first_exempt=False, layers=(0, 1),
                               candidates=2, batch=8, bootstrap=50)
    items = (_items(model, params, n=16, seed=0), _items(model, params, n=16, seed=1))
    calibration_search(model, params, out=folder, items=items, progress=False).save(folder)


def _kinds(folder: Path) -> None:
    from headlab.analyses.kinds import KindParams, compare_kinds
    from test_kinds_compare import make

    small = KindParams(n_prompts=2, seq_len=16, induction_seq_len=6, induction_batch=2, minibatch=2)
    models = {"softmax": hl.load(make(["softmax", "softmax"]), device="cpu"),
              "gla": hl.load(make(["gla", "gla"]), device="cpu")}
    compare_kinds(models, small, progress=False).save(folder)


def _circuit(folder: Path) -> None:
    from headlab.circuits import DiscoverParams, discover
    from headlab.circuits.planted import planted_induction_model, planted_induction_task

    discover(planted_induction_model(), planted_induction_task(8), params=DiscoverParams(n=8, fraction=0.5,
                                                                                       edge_prompts=8),
             out=folder, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """kind → a folder written by the real command (or the function it calls) on a tiny model; "model" and "text"."""
    root = tmp_path_factory.mktemp("reports")
    model = str(make_text_model(root / "model"))
    text = root / "text.txt"
    text.write_text(" ".join([PROMPT + " ."] * 40))
    out = {k: root / "runs" / k for k in KINDS if k not in ("scores", "twins")}
    _run(["scan", "induction", "--model", model, "--out", str(out["induction"]), "--seq-len", "8", "--batch", "2"])
    _run(["scan", "sinks", "--model", model, "--out", str(out["sinks"]), "--n-prompts", "2", "--max-tokens", "48",
          "--min-visible", "8"])
    _run(["scan", "retrieval", "--model", model, "--out", str(out["retrieval"]), "--lengths", "64", "--depths", "50",
          "--needles", "0", "--ks", "--windows", "--max-new-tokens", "4", "--razor-block", "8"])
    _run(["prune", "--model", model, "--out", str(out["prune"]), "--rank-by", "random,induction", "--fractions",
          "0,0.25,0.5", "--eval", f"ppl:{text}", "--ctx", str(CTX), "--windows", "1", "--scan-seq-len", "8",
          "--scan-batch", "2", "--no-progress"])
    _run(["icl", "train", "--out", str(out["icl"]), "--steps", "60", "--checkpoint-every", "20", "--batch", "64",
          "--no-progress"])
    _run(["moh", "analyse", "--model", model, "--out", str(out["moh_routing"]), "--active", "0.5", "--ctx", "16",
          "--windows", "2", "--text", str(text), "--relate", "induction"])
    _run(["moh", "convert", "--model", model, "--out", str(out["moh_convert"]), "--actives", "0.5", "--routers",
          "querynorm", "--rankers", "", "--heldout", str(text), "--ctx", "16", "--windows", "1", "--tasks", ""])
    _calibration(out["calibration"])
    _kinds(out["kinds"])
    _circuit(out["circuit"])
    llama = _llama_folder(root / "llama")
    _run(["linearize", "build", "--model", llama, "--out", str(root / "lin"), "--steps", "3", "--windows", "2",
          "--seq-len", "16", "--feature-dim", "8", "--text", str(text)])
    _run(["linearize", "analyse", "--model", llama, "--linearized", str(root / "lin" / "model"), "--out",
          str(out["linearize"]), "--ks", "0,8", "--needle-lengths", "", "--windows", "2"])
    out["scores"] = out["prune"] / "rankings" / "induction"  # any saved HeadScores opens too
    out["twins"] = TWINS_DIR  # `headlab train twins` output, committed (training even 5 steps takes ~1 min here)
    return {**out, "model": Path(model), "text": text, "root": root / "runs"}


def _llama_folder(folder: Path) -> str:
    """A tiny random Llama with the word-level tokenizer (linearize needs a Llama-family model)."""
    import transformers as T

    make_text_model(folder)  # the tokenizer files; the GPT-2 weights are replaced below
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (folder / name).unlink(missing_ok=True)
    from test_explore import WORDS

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, bos_token_id=0)
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def _best(scores: torch.Tensor, largest: bool = True) -> float:
    flat = scores.flatten()
    flat = flat[~flat.isnan()]
    return float(flat.max() if largest else flat.min())


def _check_top(report, scores: HeadScores, maps: list[str], label=lambda m: m) -> None:
    """Each map's first top row is the map's own maximum, at that head; rows are in descending order."""
    for m in maps:
        rows = [(h, v) for name, h, v in report.top if name == label(m)]
        assert rows, (report.kind, m)
        head = hl.HeadRef.parse(rows[0][0])
        assert rows[0][1] == pytest.approx(_best(scores.maps[m]), abs=1e-6)
        assert float(scores.maps[m][head.layer, head.head]) == pytest.approx(rows[0][1], abs=1e-6)
        assert [v for _, v in rows] == sorted((v for _, v in rows), reverse=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_opens_with_top_heads_settings_and_figures(built, kind):
    report = open_report(built[kind])
    assert report.kind == kind == detect(built[kind])
    assert report.figures and all(isinstance(f, go.Figure) for _, f in report.figures)
    assert report.settings_md.startswith("| setting | value |") and report.settings_md.count("\n") >= 3
    md = report.markdown()
    assert report.title in md and str(report.folder) in md
    if kind in ("induction", "sinks", "calibration", "scores"):
        _check_top(report, report.result, [report.result.primary])
    if kind == "induction":
        _check_top(report, report.result, ["prev_token"])
        assert "params.seq_len | 8 |" in report.settings_md
    elif kind == "retrieval":
        _check_top(report, report.result.scores, ["retrieval"])
        _check_top(report, report.result.razor, ["echo", "induction"])
        assert {"retrieval_heatmap", "masking"} <= set(report.names) and "| baseline |" in report.notes_md
    elif kind == "prune":
        for name, ranking in report.result.rankings.items():
            _check_top(report, ranking, ["score"], label=lambda m, n=name: f"{n}: importance")
        assert "params.fractions | [0.0, 0.25, 0.5] |" in report.settings_md
    elif kind == "icl":
        assert report.top == () and "no per-head scores" in report.top_md
        assert report.names == ["training curves", "KQ and OV"] and "train.steps | 60 |" in report.settings_md
    elif kind == "kinds":
        for key, sc in report.result.scores.items():
            _check_top(report, sc, ["induction_share"], label=lambda m, k=key: f"{k}: {m}")
    elif kind == "circuit":
        effects = {str(h.head): h.effect for h in report.result.heads}
        assert report.top[0][2] == max(effects.values(), key=abs) and report.top[0][1] in effects
        assert "task | planted_induction" in report.settings_md or "task |" in report.settings_md
    elif kind == "moh_routing":
        _check_top(report, report.result.scores, ["frequency"])
    elif kind == "linearize":
        _check_top(report, report.result, ["rel_error"])
        assert "hybrid" in report.names
    elif kind == "twins":
        runs = {p.name: json.loads((p / "run.json").read_text()) for p in TWINS_DIR.iterdir()
                if (p / "run.json").is_file()}
        assert report.top == () and report.names == ["training loss"] and len(report.figures[0][1].data) == len(runs)
        for name, run in runs.items():
            assert f"| {run['name']} | {'+'.join(run['layer_kinds'])} | {run['n_params']} | " \
                   f"{run['final_train_loss']:.4g} |" in report.notes_md
        assert "recipe.hidden | 64 |" in report.settings_md
    elif kind == "moh_convert":
        assert report.top == () and "| moh:querynorm |" in report.notes_md


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_damaged_and_unfinished_folders_are_named(built, tmp_path):
    def fails(folder: Path, match: str) -> None:
        with pytest.raises(ReportError, match=match) as err:
            open_report(folder)
        assert str(folder.resolve()) in str(err.value) or str(folder) in str(err.value)

    fails(tmp_path / "nowhere", "is not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "is not a headlab report")
    fails(built["model"], "is not a headlab report")  # a model folder is not a report

    torn = _copy(built["induction"], tmp_path / "torn")
    (torn / "scores.json").write_text((torn / "scores.json").read_text()[:100])
    fails(torn, "marker file scores.json is missing or damaged")
    bad_items = _copy(built["sinks"], tmp_path / "bad_items")
    (bad_items / "items.safetensors").write_bytes(b"not safetensors")
    fails(bad_items, "cannot be read")
    writing = _copy(built["induction"], tmp_path / "writing")
    (writing / "scores.json").unlink()
    fails(writing, "not finished: items.safetensors is there but scores.json")
    temp = _copy(built["induction"], tmp_path / "temp")
    (temp / ".scores.json.x1.tmp").write_text("{")
    fails(temp, "half-written")

    prune = _copy(built["prune"], tmp_path / "prune")
    lines = (prune / "results.jsonl").read_text().splitlines()
    (prune / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a torn last row
    with pytest.warns(UserWarning, match="unreadable line"):
        fails(prune, "1 of 6 .* rows are not in results.jsonl yet")
    shutil.rmtree(prune / "rankings" / "random")
    (prune / "results.jsonl").write_text("\n".join(lines) + "\n")
    fails(prune, "ranking of random is missing")

    icl = _copy(built["icl"], tmp_path / "icl")
    (icl / "run.json").unlink()
    fails(icl, "checkpoint.safetensors has no run.json")
    (icl / "run.json").write_text(json.dumps({"analysis": "something else"}))
    fails(icl, "not an `icl train` run")
    circuit = _copy(built["circuit"], tmp_path / "circuit")
    (circuit / "circuit.json").unlink()
    fails(circuit, "circuit.json .* is not")
    moh = _copy(built["moh_routing"], tmp_path / "moh")
    (moh / "summary.json").unlink()
    fails(moh, "summary.json .* is not")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "run.json").write_text(json.dumps({"name": "x"}))
    fails(odd, "not a run the explorer knows")


def test_library_lists_reports_and_keeps_clients_inside_its_roots(built, tmp_path):
    found = dict(find_reports([built["root"]]))
    assert {k for k in KINDS if k not in ("scores", "twins")} == {kind for kind in found.values()}
    assert built["prune"].resolve() / "rankings" / "induction" not in found  # a report's parts are not listed
    library = ReportLibrary([built["icl"]], roots=[built["root"]])
    values = [v for _, v in library.choices()]
    assert values[0] == str(built["icl"].resolve()) and len(values) == len(found)
    assert [label for label, _ in library.of_kind("prune")] == ["prune · runs/prune"]
    first = library.open(built["induction"])
    assert library.open(str(built["induction"])) is first  # cached
    status, md, names, fig = library.view(built["induction"], "heatmap prev_token")
    assert "induction report" in status and names[1] == "heatmap prev_token" and isinstance(fig, go.Figure)
    assert fig.layout.title.text.startswith("induction: prev_token")
    outside = _copy(built["induction"], tmp_path / "outside")
    with pytest.raises(ReportError, match="--allow-folders"):
        library.open(outside)
    with pytest.raises(ReportError, match="--allow-folders"):
        library.open(built["root"] / ".." / ".." / "outside")
    assert ReportLibrary(roots=[built["root"]], allow_folders=True).open(outside).kind == "induction"
    default = ReportLibrary([built["icl"]])  # roots default to the opened folders (and the repo's runs/)
    assert default.open(built["icl"]).kind == "icl"
    with pytest.raises(ReportError, match="--allow-folders"):
        default.open(built["prune"])


@pytest.fixture(scope="module")
def live(built):
    explorer = Explorer(ExplorerSettings(max_tokens=200, top_k=5, allowed=(str(built["model"]),)))
    library = ReportLibrary(roots=[built["root"]])
    session = explorer.analyse(str(built["model"]), PROMPT, True, "induction")[3]
    return explorer, library, session


def test_pruning_tab_applies_the_experiments_own_mask(built, live):
    explorer, library, session = live
    folder = str(built["prune"])
    status, fig, rankers, fractions, table = prune_view(library, folder)
    assert rankers == ["random", "induction"] and fractions == [0.0, 0.25, 0.5] and isinstance(fig, go.Figure)
    rows = [json.loads(line) for line in (built["prune"] / "results.jsonl").read_text().splitlines()]
    assert f"{rows[-1]['value']:.4g}" in table
    model = explorer.cache.get(session.model)
    ids = torch.tensor([session.ids])
    for ranker in rankers:
        row = next(r for r in rows if r["ranker"] == ranker and r["fraction"] == 0.5)
        _, md, loss = apply(explorer, library, session, folder, ranker, 0.5)
        with hl.edit(model, hl.ablate(hl.as_heads(row["removed"]))):  # the heads the experiment itself recorded
            want = model.loss(ids).item()
        assert loss == pytest.approx(want, abs=1e-5) and len(row["removed"]) == 4
        assert f"{want:.4f}" in md and f"{row['value']:.4f}" in md and "⚠" not in md
        assert all(h in md for h in row["removed"])
    # between the run's fractions: the same rule, round(f · L · H) of the saved ranking's least important heads
    ranking = HeadScores.load(built["prune"] / "rankings" / "induction").scores.flatten()
    order = sorted(range(8), key=lambda i: (float(ranking[i]), i))[:3]
    _, md, loss = apply(explorer, library, session, folder, "induction", 0.4)
    with hl.edit(model, hl.ablate([hl.HeadRef(i // 4, i % 4) for i in order])):
        assert loss == pytest.approx(model.loss(ids).item(), abs=1e-5)
    assert "3 of 8 heads" in md and "the run recorded" not in md
    _, _, zero = apply(explorer, library, session, folder, "random", 0.0)
    assert zero == pytest.approx(session.loss, abs=1e-6)
    for bad, match in [(("random", 1.5), "must lie in"), (("atp", 0.5), "choose a ranker"), (("random", None), "must lie in")]:
        with pytest.raises(EditError, match=match):
            apply(explorer, library, session, folder, *bad)
    with pytest.raises(ReportError, match="not a pruning run"):
        apply(explorer, library, session, str(built["icl"]), "random", 0.5)
    assert "⚠" not in apply(explorer, library, session, folder, "random", 0.5)[0]  # the run's own model


def test_pruning_tab_refuses_a_model_of_another_shape_and_warns_on_another_model(built, live, tmp_path):
    import transformers as T

    explorer, library, _ = live
    other = tmp_path / "other"
    make_text_model(other)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=15, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(other)
    ex = Explorer(ExplorerSettings(max_tokens=200, allow_folders=True))
    session = ex.analyse(str(other), PROMPT, True, "induction")[3]
    with pytest.raises(EditError, match=r"ranked 2 × 4 heads .* has 1 × 2"):
        apply(ex, library, session, str(built["prune"]), "random", 0.5)
    same_shape = tmp_path / "same_shape"
    make_text_model(same_shape)  # the same random weights, saved under another name
    session = ex.analyse(str(same_shape), PROMPT, True, "induction")[3]
    status, _, loss = apply(ex, library, session, str(built["prune"]), "random", 0.5)
    assert f"⚠ The run ranked {built['model']}'s heads" in status and math.isfinite(loss)


def test_pruning_tab_loss_equals_the_runs_recorded_row_on_the_runs_own_text(built, live):
    """On the prune run's own eval window (ppl, one window of CTX tokens after BOS) the tab's masked loss is the
    row's recorded loss, and re-measuring the run's eval gives the recorded perplexity."""
    from headlab.prune.evals import TextEval

    explorer, library, _ = live
    model = explorer.cache.get(str(built["model"]))
    window = TextEval(path=str(built["text"]), ctx=CTX, windows=1).tokens(model)[0].tolist()
    session = Session(model=str(built["model"]), ids=tuple(window), maps={}, loss=model.loss([window]).item())
    rows = [json.loads(line) for line in (built["prune"] / "results.jsonl").read_text().splitlines()]
    for row in rows:
        _, _, loss = apply(explorer, library, session, str(built["prune"]), row["ranker"], row["fraction"])
        assert loss == pytest.approx(row["metrics"]["loss"], abs=1e-5), row["ranker"]
    row = next(r for r in rows if r["ranker"] == "induction" and r["fraction"] == 0.25)
    _, md, metrics = remeasure(explorer, library, session, str(built["prune"]), "induction", 0.25)
    assert metrics["ppl"] == pytest.approx(row["value"], rel=1e-6) and f"{row['value']:.4f}" in md


def test_icl_tab_shows_the_saved_checkpoints(built, live):
    from headlab.icl.training import ICLRun

    _, library, _ = live
    run = ICLRun.load(built["icl"])
    status, fig, curves, (lo, hi, spacing), step = icl_open(library, str(built["icl"]))
    assert (lo, hi, spacing, step) == (0, 60, 20, 60) and isinstance(curves, go.Figure)
    assert "step 60" in fig.layout.title.text and f"{float(run.history['eval_mse'][-1]):.4f}" in status
    for asked, shown, index in [(25, 20, 1), (31, 40, 2), (0, 0, 0), (999, 60, 3)]:
        _, fig, step = icl_view(library, str(built["icl"]), asked)
        assert step == shown and f"step {shown} " in fig.layout.title.text
        kq = [t for t in fig.data if t.y is not None and len(t.y) > 1]
        assert torch.allclose(torch.tensor(kq[0].z), run.history["kq"][index, 0], atol=1e-6)
        assert torch.allclose(torch.tensor(kq[1].z), run.history["kq"][index, 1], atol=1e-6)
    with pytest.raises(ReportError, match="not an `icl train` run"):
        icl_view(library, str(built["prune"]), 0)


def test_explore_command_checks_its_reports_before_serving(built, tmp_path, capsys):
    from headlab.cli import build_parser

    args = build_parser().parse_args(["explore", "--report", str(built["prune"]), "--report", str(built["icl"]),
                                      "--reports-root", str(built["root"])])
    assert args.report == [built["prune"], built["icl"]] and args.reports_root == [built["root"]]
    (tmp_path / "empty").mkdir()
    assert main(["explore", "--model", "toy-induction", "--report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a headlab report" in err and str(tmp_path / "empty") in err


def test_an_interrupted_icl_run_opens_with_a_note(tmp_path, monkeypatch):
    import headlab.icl.training as training
    from headlab.icl.models import ModelParams
    from headlab.icl.tasks import TaskParams

    tp = training.TrainParams.for_kind("softmax", steps=60, batch=32, checkpoint_every=20)
    real = training.sample

    def interrupted(task, batch, **kw):
        if kw.get("seed") == training._data_seed(tp.seed, 30):
            raise KeyboardInterrupt
        return real(task, batch, **kw)

    monkeypatch.setattr(training, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(TaskParams.he(), ModelParams(kind="softmax", heads=2), tp, out=tmp_path, progress=False)
    report = open_report(tmp_path)
    assert report.kind == "icl" and "stopped at step 20 of 60" in report.notes_md
