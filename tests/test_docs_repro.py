"""The retrieval-head and pruning reproduction tables say what headlab's own loaders read from the committed results."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from headlab.analyses.razor import RetrievalReport, summarize
from headlab.prune import PruneResults

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_repro

sys.path.pop(0)


def _rows(lines: list[str], header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header begins with `header_start`."""
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    out = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_retrieval_tables_match_headlab_summary():
    folder = ROOT / docs_repro.RETRIEVAL
    assert (folder / "command.json").exists(), f"no committed retrieval scan in {folder}: the reproductions page needs it"
    report = RetrievalReport.load(folder)
    lines = docs_repro.retrieval_section()
    params = report.scores.params
    # masking rows: recomputed with headlab's summarize() over the records at the masking length
    at = params["mask_lengths"] or params["lengths"]
    masked = summarize([r for r in report.records if r["length"] in at])
    rows = _rows(lines, "K |")
    assert [int(r[0]) for r in rows] == list(params["ks"])
    for row, k in zip(rows, params["ks"]):
        top = masked[f"top{k}-{params['mask_how']}"]
        assert row[2] == f"{100 * top['accuracy']:.1f} ({100 * top['found']:.1f}%)"
        rand = [masked[f"random{k}-{params['mask_how']}-{d}"]["accuracy"] for d in range(params["draws"])]
        assert row[3].startswith(f"{100 * sum(rand) / len(rand):.1f} ({100 * min(rand):.1f}–{100 * max(rand):.1f};")
    # Razor rows: headlab's saved summary over every trial
    rows = _rows(lines, "recent window")
    for row, w in zip(rows, params["windows"]):
        s = report.summary[f"razor-w{w}"]
        assert row[1] == f"{100 * s['kv_fraction']:.1f}%"
        assert row[2] == f"{100 * s['accuracy']:.1f} ({100 * s['found']:.1f}%)"
    assert rows[-1][2].startswith(f"{100 * report.summary['baseline']['accuracy']:.1f}")
    # sparsity: the shares recomputed from the score map itself
    scores = report.scores.scores
    assert f"| heads scoring > 0.1 | 3–6% | {100 * float((scores > 0.1).float().mean()):.1f}% |" in lines
    assert f"| heads scoring > 0.5 | < 5% | {100 * float((scores > 0.5).float().mean()):.1f}% |" in lines
    head, best = report.scores.top(1)[0]
    assert f"Top retrieval heads: L{head.layer}H{head.head} {best:.2f}" in "\n".join(lines)


def test_pruning_tables_match_headlab_results():
    folder = ROOT / docs_repro.PRUNE
    assert (folder / "command.json").exists(), f"no committed pruning run in {folder}: the reproductions page needs it"
    results = PruneResults.load(folder)
    lines = docs_repro.pruning_section()
    specs = list(dict.fromkeys(r["eval"] for r in results.rows))
    starts = [i for i, line in enumerate(lines) if line.startswith("| removed |")]
    assert len(starts) == len(specs)
    for spec, start in zip(specs, starts):
        table = results.table(spec)  # {ranker: {fraction: primary metric}}
        header = [c.strip().strip("`") for c in lines[start].strip("|").split("|")]
        rankers = header[2:]
        assert set(rankers) == set(table)
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            fraction = float(cells[0].rstrip("%")) / 100
            for name, cell in zip(rankers, cells[2:]):
                got = next(v for f, v in table[name].items() if abs(f - fraction) < 1e-9)
                assert cell == f"{got:.2f}", (spec, name, fraction)
    assert re.search(r"Change of the \w+ against the unpruned", "\n".join(lines))
