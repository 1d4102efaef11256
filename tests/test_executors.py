"""Sweeps on Ray: a local 2-worker cluster started and stopped by the tests; the same rows as the serial run, a worker
killed mid-run loses nothing, an interrupted driver resumes."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import headlab as hl
from headlab.executors import ExecutorError, LocalExecutor, RayExecutor, parse_executor
from headlab.prune.experiment import PruneParams, prune_experiment, read_rows
from headlab.prune.rankers import RankParams

ray = pytest.importorskip("ray")
PARAMS = PruneParams(rankers=("random", "induction"), fractions=(0.0, 0.25, 0.5, 0.75), evals=("task:induction",),
                     task_seq_len=16, rank=RankParams(scan_seq_len=16, calib_seq_len=16))


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the slow test worker below, by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_folder):
    return hl.load(str(tiny_folder("llama")), device="cpu")


def _rows(out) -> dict:
    return {(r["ranker"], r["fraction"], r["eval"]): (r["metrics"], r["removed"]) for r in read_rows(out)}


def test_parse_executor():
    assert isinstance(parse_executor(None), LocalExecutor) and isinstance(parse_executor("local"), LocalExecutor)
    assert parse_executor("ray", workers=3).workers == 3 and parse_executor("ray").address is None
    assert parse_executor("ray:auto").address == "auto"
    with pytest.raises(ExecutorError, match="unknown executor"):
        parse_executor("dask")


def test_prune_rows_on_ray_equal_the_serial_run(cluster, model, tmp_path):
    torch.set_num_threads(1)  # the workers' thread count: the same float reductions
    serial = prune_experiment(model, PARAMS, tmp_path / "serial", progress=False)
    on_ray = prune_experiment(model, PARAMS, tmp_path / "ray", progress=False, executor=RayExecutor(workers=2))
    assert _rows(tmp_path / "serial") == _rows(tmp_path / "ray")
    assert len(on_ray.rows) == len(serial.rows) == 8


class _KillAfterFirst(RayExecutor):
    """A RayExecutor that kills its first worker's process once the first result is in (the actor restarts)."""

    def run(self, factory, jobs, on_result):
        killed = []

        def first(job, result):
            if not killed:
                killed.append(self.pids[0])  # (a call on the actor would queue behind its jobs)
                ray.kill(self.actors[0], no_restart=False)
            on_result(job, result)
        super().run(factory, jobs, first)
        self.killed = killed


def test_a_killed_worker_loses_nothing(cluster, model, tmp_path):
    torch.set_num_threads(1)
    prune_experiment(model, PARAMS, tmp_path / "serial", progress=False)
    executor = _KillAfterFirst(workers=2)
    prune_experiment(model, PARAMS, tmp_path / "killed", progress=False, executor=executor)
    assert executor.killed and _rows(tmp_path / "serial") == _rows(tmp_path / "killed")
    lines = (tmp_path / "killed" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len({(json.loads(x)["ranker"], json.loads(x)["fraction"]) for x in lines})  # no duplicate


def _slow_square(x: int) -> tuple[int, int]:
    import os

    time.sleep(0.3)
    return x * x, os.getpid()


def _factory():
    return _slow_square


def test_jobs_of_a_killed_actor_are_retried_on_its_restart(cluster):
    executor = _KillAfterFirst(workers=2)
    got: dict[int, int] = {}
    pids = set()

    def collect(job, result):
        assert job not in got  # each job reported once
        got[job] = result[0]
        pids.add(result[1])

    executor.run(_factory, range(10), collect)
    assert got == {i: i * i for i in range(10)}
    # the killed actor's first process did a job; its restarted process does more only if it comes back before the
    # other actor has taken the rest (on a loaded machine it may not): two or three processes
    assert executor.killed[0] in pids and len(pids) in (2, 3)


class _Interrupt(RayExecutor):
    def run(self, factory, jobs, on_result):
        seen = []

        def stop(job, result):
            on_result(job, result)
            seen.append(job)
            if len(seen) == 3:
                raise KeyboardInterrupt  # the driver dies with some rows written
        super().run(factory, jobs, stop)


def test_an_interrupted_driver_resumes(cluster, model, tmp_path):
    torch.set_num_threads(1)
    prune_experiment(model, PARAMS, tmp_path / "serial", progress=False)
    with pytest.raises(KeyboardInterrupt):
        prune_experiment(model, PARAMS, tmp_path / "ray", progress=False, executor=_Interrupt(workers=2))
    assert 0 < len(read_rows(tmp_path / "ray")) < 8
    prune_experiment(model, PARAMS, tmp_path / "ray", progress=False, executor=RayExecutor(workers=2))
    assert _rows(tmp_path / "serial") == _rows(tmp_path / "ray")


def test_a_model_from_an_object_is_refused_on_ray(cluster, tmp_path):
    from conftest import tiny_config

    cls, cfg = tiny_config("llama")
    obj = hl.load(cls(cfg).eval())  # made in memory: no name or folder a worker could load
    params = PruneParams(rankers=("random",), fractions=(0.25,), evals=("task:induction",), task_seq_len=16)
    with pytest.raises(hl.HeadlabError, match="loaded from an object"):
        prune_experiment(obj, params, tmp_path / "x", progress=False, executor=RayExecutor(workers=1))


@pytest.mark.slow
def test_needle_trials_on_ray_equal_the_serial_run(cluster, tmp_path):
    """The retrieval scan's trials on Ray (each worker loads the model and builds the KJV prompts itself)."""
    from headlab.analyses.retrieval import RetrievalParams, retrieval_scan
    from test_explore import make_text_model  # a word-level tokenizer: the KJV haystack reads, mostly as <unk>

    folder = str(make_text_model(tmp_path / "text"))
    model = hl.load(folder)
    torch.set_num_threads(1)
    params = RetrievalParams(lengths=(128, 192), depths=(50.0,), needles=(0, 1), ks=(2,), draws=1, windows=(16,),
                             max_new_tokens=6, razor=hl.analyses.razor.RazorParams(block=16))
    serial = retrieval_scan(model, params, out=tmp_path / "serial", progress=False)
    on_ray = retrieval_scan(model, params, out=tmp_path / "ray", progress=False, executor=RayExecutor(workers=2))

    def records(report):
        return sorted((r["trial"], r["spec"], tuple(r["generated"]), r["recall"], json.dumps(r.get("scores")))
                      for r in report.records)
    assert records(serial) == records(on_ray) and len(serial.records) == 4 * 5


def test_independent_calibration_search_on_ray_equals_the_serial_one(cluster, tmp_path):
    """ACT's independent head search: each candidate head tried by a Ray worker; the search state equals the serial
    one entry by entry (the greedy search is sequential and stays in the driver)."""
    from headlab.analyses.calibration import CalibrationParams, calibration_search
    from headlab.sink_rule import SinkRule
    from test_sinks_calibration import _items

    model = hl.load("toy-induction", device="cpu")
    torch.set_num_threads(1)
    params = CalibrationParams(beta=0.0, rule=SinkRule(min_visible=4), first_exempt=False, layers=(0, 1),
                               candidates=4, batch=8, search="independent", bootstrap=200)
    items = (_items(model, params, seed=0), _items(model, params, seed=1))
    serial = calibration_search(model, params, out=tmp_path / "serial", items=items, progress=False)
    on_ray = calibration_search(model, params, out=tmp_path / "ray", items=items, progress=False,
                                executor=RayExecutor(workers=2))
    state = [json.loads((tmp_path / d / "state.json").read_text())["tried"] for d in ("serial", "ray")]
    assert state[0] == state[1] and len(state[0]) == 4
    assert torch.equal(serial.maps["kept"], on_ray.maps["kept"])


@pytest.mark.slow
def test_a_scan_over_several_models_on_ray_equals_the_serial_one(cluster):
    """compare_kinds with one model per unit: each worker loads its twin by name; the same head metrics."""
    from headlab.analyses.kinds import KindParams, compare_kinds

    torch.set_num_threads(1)
    names = {"softmax": "twin-recall-softmax", "gla": "twin-recall-gla", "based": "twin-recall-based"}
    params = KindParams(n_prompts=4)
    serial = compare_kinds({k: hl.load(v) for k, v in names.items()}, params, progress=False)
    on_ray = compare_kinds(names, params, progress=False, executor=RayExecutor(workers=2))
    assert on_ray.layer_kinds == serial.layer_kinds
    for key in names:
        for name, value in serial.scores[key].maps.items():
            assert torch.allclose(value, on_ray.scores[key].maps[name], equal_nan=True), (key, name)
    with pytest.raises(ValueError, match="bundled name or folder"):
        compare_kinds({"a": hl.load("twin-recall-softmax")}, params, executor=RayExecutor(workers=1))
