"""Greedy decoding of headlab's linear-attention LMs: the recurrent cache (HeadlabLinearCache) vs the prefix rerun.

For each twin kind (the layer stacks of `headlab.models.linear.config.STACKS`: softmax, linear, hedgehog, based =
swa + based, gla, deltanet) it builds a random-init model with the committed text twins' geometry
(data/linear-twins/text-<kind>/config.json: 2 layers, hidden 64, 4 heads of 16, MLP 256, vocab 257, window 8, BASED's
Taylor map on d = 16) but max_position_embeddings = max prompt + new tokens (the speed does not depend on trained
weights), and for each prompt length L, side by side on the same prompt:

  recurrent  one prefill forward with use_cache=True (the chunked forms, keeping each layer's state / K/V), then one
             forward per new token on the cache;
  rerun      every new token from a forward over the whole prefix (use_cache=False, what generation did before).

Both compute only the last position's logits (logits_to_keep=1) and pick the argmax (greedy); "same" says whether the
two produced the same tokens. Decode tokens/s counts the steps after the first token (the first comes from the
prefill, or the rerun's first forward, which is the same forward). The rerun is skipped where its estimate (the
number of forwards × the prefill's time) passes --rerun-budget seconds; the table says so.

Usage: python benchmarks/linear_decode.py [--lengths 512 2048 8192] [--new 32] [--kinds softmax linear ...]
       [--threads 1] [--rerun-budget 60] [--out benchmarks/results/linear_decode_cpu.txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--new", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--kinds", nargs="+", default=None, help="twin kinds (default: all of STACKS)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rerun-budget", type=float, default=60.0,
                   help="skip the prefix rerun where its estimated time passes this many seconds")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    return p.parse_args()


ARGS = _parse()

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from headlab.models.linear import HeadlabLinearConfig, HeadlabLinearForCausalLM  # noqa: E402
from headlab.models.linear.config import STACKS  # noqa: E402


def model_for(kind: str, positions: int) -> HeadlabLinearForCausalLM:
    cfg = HeadlabLinearConfig.from_pretrained(ROOT / "data" / "linear-twins" / f"text-{kind}")
    cfg.max_position_embeddings = positions
    torch.manual_seed(0)
    return HeadlabLinearForCausalLM(cfg).eval()


@torch.no_grad()
def recurrent(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float, float]:
    """(new tokens, prefill seconds, seconds of the decode steps after the first token)."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        out = model(tokens[-1][:, None], cache=out.cache, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1))
    t2 = time.perf_counter()
    return torch.stack(tokens, 1), t1 - t0, t2 - t1


@torch.no_grad()
def rerun(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float, float]:
    """(new tokens, first forward seconds, seconds of the forwards after the first token)."""
    seq, tokens = ids, []
    t0 = time.perf_counter()
    for i in range(new):
        if i == 1:
            t1 = time.perf_counter()
        nxt = model(seq, logits_to_keep=1).logits[:, -1].argmax(-1)
        tokens.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    t2 = time.perf_counter()
    return torch.stack(tokens, 1), t1 - t0, t2 - t1


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    kinds = ARGS.kinds or list(STACKS)
    positions = max(ARGS.lengths) + ARGS.new
    command = "python benchmarks/linear_decode.py " + " ".join(sys.argv[1:])
    lines = [
        f"# {command}",
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}, "
        f"device cpu, threads {torch.get_num_threads()}, dtype float32, load average at start "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared)",
        f"# random-init models with the text twins' geometry, max_position_embeddings {positions}; batch {ARGS.batch}, "
        f"{ARGS.new} new tokens per prompt (greedy, logits_to_keep=1)",
        "# decode tok/s: the steps after the first token (it comes from the prefill / the rerun's first forward); "
        "speedup = recurrent / rerun decode tok/s",
        f"# rerun skipped where 'forwards × prefill time' passes {ARGS.rerun_budget:.0f} s",
        f"{'kind':>9} {'stack':>18} {'L':>6} {'prefill s':>10} {'recurrent tok/s':>16} {'rerun tok/s':>12} "
        f"{'speedup':>8} {'same':>5}",
    ]
    print("\n".join(lines), flush=True)
    start = time.perf_counter()
    for kind in kinds:
        model = model_for(kind, positions)
        stack = "+".join(STACKS[kind])
        g = torch.Generator().manual_seed(0)
        model(torch.randint(0, 256, (ARGS.batch, 16), generator=g), use_cache=True)  # warm-up
        for L in ARGS.lengths:
            ids = torch.randint(0, model.config.vocab_size - 1, (ARGS.batch, L), generator=g)
            toks, prefill, dec = recurrent(model, ids, ARGS.new)
            rate = ARGS.batch * (ARGS.new - 1) / dec
            estimate = ARGS.new * prefill
            if estimate > ARGS.rerun_budget:
                row = (f"{kind:>9} {stack:>18} {L:>6} {prefill:>10.3f} {rate:>16.1f} {'skipped':>12} {'-':>8} {'-':>5}"
                       f"   rerun skipped: estimated {estimate:.0f} s > {ARGS.rerun_budget:.0f} s")
            else:
                ref, _, rdec = rerun(model, ids, ARGS.new)
                rrate = ARGS.batch * (ARGS.new - 1) / rdec
                same = "yes" if torch.equal(toks, ref) else "NO"
                row = (f"{kind:>9} {stack:>18} {L:>6} {prefill:>10.3f} {rate:>16.1f} {rrate:>12.2f} "
                       f"{rate / rrate:>7.1f}× {same:>5}")
            print(row, flush=True)
            lines.append(row)
    tail = (f"# done in {time.perf_counter() - start:.0f} s; load average at end "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(tail)
    lines.append(tail)
    if ARGS.out is not None:
        ARGS.out.parent.mkdir(parents=True, exist_ok=True)
        ARGS.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
