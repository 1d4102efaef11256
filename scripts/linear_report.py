#!/usr/bin/env python
"""The numbers issue 4 asks for, in one report: identity error per kind, the twins' results, kernel errors,
and the head comparison across kinds.

    TRITON_INTERPRET=1 python scripts/linear_report.py --out runs/linear-report   # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import headlab as hl  # noqa: E402
from headlab.analyses.kinds import pattern_identity_error  # noqa: E402
from headlab.models.linear import KINDS, HeadlabLinearConfig, HeadlabLinearForCausalLM  # noqa: E402
from headlab.models.linear.train import STACKS, TASKS, TWINS_DIR, recall_eval_batch, summary_table  # noqa: E402


def random_identity(seq_len: int = 200) -> dict[str, float]:
    res = {}
    for kind in KINDS:
        torch.manual_seed(0)
        cfg = HeadlabLinearConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, layer_kinds=[kind, kind], window=16,
                                  max_position_embeddings=seq_len, initializer_range=0.2)
        model = hl.load(HeadlabLinearForCausalLM(cfg), device="cpu")
        ids = torch.randint(0, 64, (2, seq_len), generator=torch.Generator().manual_seed(1))
        res[kind] = max(pattern_identity_error(model, ids).values())
    return res


def trained_identity() -> dict[str, float]:
    res = {}
    for task in TASKS:
        for kind in STACKS:
            model = hl.load(TWINS_DIR / f"{task}-{kind}", device="cpu")
            if task == "recall":
                ids = recall_eval_batch(8, 16, seed=0)[0]
            else:
                ids = model.encode([(TWINS_DIR.parents[0] / "text" / "kjv-genesis-1-15.txt").read_text()[:127]]).input_ids
            res[f"{task}-{kind}"] = max(pattern_identity_error(model, ids).values())
    return res


def kernel_errors() -> dict[str, float]:
    from headlab_kernels.linear_attention import gla_attention, linear_attention
    from headlab_kernels.linear_attention.reference import gla_recurrent, linear_recurrent

    g = torch.Generator().manual_seed(0)
    res = {}
    for T in (37, 257):
        q, k = (torch.randn(2, 3, T, 32, generator=g).abs() for _ in range(2))
        v = torch.randn(2, 3, T, 48, generator=g)
        gate = -torch.rand(2, 3, T, 32, generator=g) * 0.5
        ref = linear_recurrent(q, k, v)
        for impl in ("torch", "triton"):
            res[f"linear T={T} {impl}"] = float((linear_attention(q, k, v, impl=impl) - ref).abs().max() / ref.abs().max())
        ref = gla_recurrent(q, k, v, gate)
        for impl in ("torch", "triton"):
            res[f"gla T={T} {impl}"] = float((gla_attention(q, k, v, gate, impl=impl) - ref).abs().max() / ref.abs().max())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/linear-report"))
    ap.add_argument("--skip-compare", action="store_true", help="leave out the head comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"identity_random_init": random_identity(), "identity_trained": trained_identity(),
              "kernel_vs_recurrent_reference": kernel_errors(), "twins": summary_table(TWINS_DIR)}
    if not args.skip_compare:
        from headlab.analyses.kinds import KindParams, compare_kinds

        for task in TASKS:
            models = {kind: hl.load(TWINS_DIR / f"{task}-{kind}", device="cpu") for kind in STACKS}
            comp = compare_kinds(models, KindParams(source=task), progress=False)
            comp.save(args.out / f"compare-{task}")
            report[f"compare_{task}"] = comp.summary()
            (args.out / f"compare-{task}.md").write_text(comp.to_markdown())
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("compare")}, indent=1, default=str))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
