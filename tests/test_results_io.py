"""The persistence toolkit: atomic writes, torn JSON lines, unreadable results treated as absent or named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from headlab.results import (HeadScores, ResultError, append_jsonl, read_json, read_jsonl, save_tensors,
                             write_atomic, write_json)


def test_write_atomic_leaves_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    code = textwrap.dedent(f"""
        import os, signal
        from headlab import results
        real = os.replace
        def die(*a):  # killed after the temp file is written, before it replaces the old one
            os.kill(os.getpid(), signal.SIGKILL)
        results.os.replace = die
        results.write_json({str(path)!r}, {{"v": 2}})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    assert read_json(path) == {"v": 1}
    write_atomic(path, '{"v": 3}')
    assert read_json(path) == {"v": 3}
    assert [p.name for p in tmp_path.iterdir() if p.name != "x.json"]  # the dead writer's temp file is left ...
    assert all(p.name.startswith(".x.json.") for p in tmp_path.iterdir() if p.name != "x.json")  # ... hidden


def test_jsonl_skips_and_ends_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"i": 0}, {"i": 1}])
    with path.open("a") as f:
        f.write('{"i": 2, "cut sh')  # a kill in the middle of a line
    with pytest.warns(UserWarning, match="1 unreadable"):
        assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, {"i": 2})
    with pytest.warns(UserWarning):
        assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert path.read_text().endswith('{"i": 2}\n')


def test_unreadable_results_are_named_or_treated_as_absent(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"half": ')
    with pytest.raises(ResultError, match="state.json"):
        read_json(path)
    with pytest.warns(UserWarning, match="treating it as absent"):
        assert read_json(path, missing_ok=True) is None
    assert read_json(tmp_path / "none.json", missing_ok=True) is None


def test_head_scores_commit_marker_and_corrupt_files(tmp_path):
    sc = HeadScores(analysis="t", model="m", maps={"a": torch.rand(2, 3)}, primary="a", items={"x": torch.arange(4)})
    folder = sc.save(tmp_path / "s")
    assert HeadScores.saved(folder)
    back = HeadScores.load(folder)
    assert torch.equal(back.maps["a"], sc.maps["a"]) and torch.equal(back.items["x"], sc.items["x"])
    # items written, scores.json (the commit marker) not yet: the folder counts as absent
    (folder / "scores.json").unlink()
    assert not HeadScores.saved(folder)
    sc.save(folder)
    (folder / "items.safetensors").write_bytes(b"garbage")
    with pytest.raises(ResultError, match="items.safetensors"):
        HeadScores.load(folder)
    save_tensors(folder / "items.safetensors", sc.items)
    (folder / "scores.json").write_text(json.dumps({"analysis": "t"}))
    with pytest.raises(ResultError, match="not a headlab result"):
        HeadScores.load(folder)
    (folder / "scores.json").write_text("{")
    with pytest.warns(UserWarning):
        assert not HeadScores.saved(folder)
    assert os.listdir(folder)
