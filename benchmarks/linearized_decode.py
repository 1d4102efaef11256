"""Greedy decoding of the linearized SmolLM2-135M: the recurrent cache (LinearizedCache) vs the ordinary KV cache vs
the prefix rerun.

The model is `from_base(hl.load("smollm2-135m").hf)`: SmolLM2-135M (30 layers, 9 query heads in 3 KV groups, head
dim 64) with every head Hedgehog linear attention under identity feature maps (F = 64, 2F = 128 features; the speed
does not depend on trained maps), wrapped by headlab (its attention runs through the seam, no capture active). For
each prompt length L, side by side on the same random prompt:

  recurrent  one prefill forward with use_cache=True (a LinearizedCache: the layers keep their Hedgehog state), then
             one forward per new token continuing the state (O(1) per token in L);
  kv         the same with a transformers DynamicCache (what this model did before): each new token's row is
             recomputed over every cached key, the keys feature-mapped again (O(L) per token);
  rerun      every new token from a forward over the whole prefix (use_cache=False).

All compute only the last position's logits (logits_to_keep=1) and pick the argmax (greedy); "same" says whether
the paths produced the same tokens. Decode tokens/s counts the steps after the first token (the first comes from the
prefill, or the rerun's first forward, which is the same forward). The rerun is skipped where its estimate (the
number of forwards × the prefill's time) passes --rerun-budget seconds; the table says so. "cache MiB" is what each
cache holds after the last step (the recurrent states; the KV cache's keys and values).

Usage: python benchmarks/linearized_decode.py [--lengths 512 2048 8160] [--new 32] [--threads 1]
       [--rerun-budget 60] [--out benchmarks/results/linearized_decode_cpu.txt]
(SmolLM2 has 8192 learned RoPE positions: keep L + new <= 8192.)
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
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8160])
    p.add_argument("--new", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rerun-budget", type=float, default=60.0,
                   help="skip the prefix rerun where its estimated time passes this many seconds")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    return p.parse_args()


ARGS = _parse()

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

sys.path.insert(0, str(ROOT))
import headlab as hl  # noqa: E402
from headlab.models.linearized import from_base  # noqa: E402
from headlab.models.linearized_cache import LinearizedCache  # noqa: E402


def cache_mib(cache) -> float:
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None), *(getattr(layer, "state", None) or ())]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total / 2 ** 20


@torch.no_grad()
def cached(hf, ids: torch.Tensor, new: int, cache) -> tuple[torch.Tensor, float, float, float]:
    """(new tokens, prefill seconds, seconds of the decode steps after the first token, cache MiB)."""
    t0 = time.perf_counter()
    out = hf(ids, cache=cache, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        out = hf(tokens[-1][:, None], cache=out.cache, logits_to_keep=1)
        tokens.append(out.logits[:, -1].argmax(-1))
    t2 = time.perf_counter()
    return torch.stack(tokens, 1), t1 - t0, t2 - t1, cache_mib(out.cache)


@torch.no_grad()
def rerun(hf, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float, float]:
    """(new tokens, first forward seconds, seconds of the forwards after the first token)."""
    seq, tokens = ids, []
    t0 = t1 = time.perf_counter()
    for i in range(new):
        if i == 1:
            t1 = time.perf_counter()
        nxt = hf(seq, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)
        tokens.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    t2 = time.perf_counter()
    return torch.stack(tokens, 1), t1 - t0, t2 - t1


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    load_start = os.getloadavg()
    base = hl.load("smollm2-135m", device="cpu")
    model = hl.load(from_base(base.hf), device="cpu", tokenizer=base.tokenizer)
    hf = model.hf
    limit = hf.config.max_position_embeddings
    if max(ARGS.lengths) + ARGS.new > limit:
        raise SystemExit(f"prompt + new tokens must stay within the model's {limit} positions")
    command = "python benchmarks/linearized_decode.py " + " ".join(sys.argv[1:])
    lines = [
        f"# {command}",
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}, "
        f"device cpu, threads {torch.get_num_threads()}, dtype float32, load average at start "
        f"{' '.join(f'{x:.2f}' for x in load_start)} ({os.cpu_count()} CPUs, shared)",
        "# model: from_base(hl.load('smollm2-135m').hf) — 30 layers, 9 query heads / 3 KV groups, head dim 64, every "
        "head Hedgehog (identity maps, 2F = 128), under headlab's seam (no capture)",
        f"# batch 1, {ARGS.new} new tokens per prompt (greedy, logits_to_keep=1); decode tok/s: the steps after the "
        "first token (it comes from the prefill / the rerun's first forward)",
        "# recurrent = LinearizedCache (state); kv = DynamicCache (each new row recomputed over the cached keys); "
        "rerun = use_cache=False; ratios = recurrent tok/s over the other's",
        f"# rerun skipped where 'forwards × prefill time' passes {ARGS.rerun_budget:.0f} s; same = every path run gave "
        "the same tokens; prefill s = the recurrent path's; cache MiB after the last step",
        f"{'L':>6} {'prefill s':>10} {'recurrent tok/s':>16} {'kv tok/s':>9} {'rerun tok/s':>12} {'rec/kv':>7} "
        f"{'rec/rerun':>10} {'same':>5} {'cache MiB rec / kv':>19}",
    ]
    print("\n".join(lines), flush=True)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    hf(torch.randint(0, hf.config.vocab_size, (1, 16), generator=g), use_cache=True)  # warm-up
    for L in ARGS.lengths:
        ids = torch.randint(0, hf.config.vocab_size, (1, L), generator=g)
        toks, prefill, dec, rec_mib = cached(hf, ids, ARGS.new, LinearizedCache(hf.config))
        rate = (ARGS.new - 1) / dec
        kv_toks, _, kv_dec, kv_mib = cached(hf, ids, ARGS.new, DynamicCache(config=hf.config))
        kv_rate = (ARGS.new - 1) / kv_dec
        same = torch.equal(toks, kv_toks)
        estimate = ARGS.new * prefill
        if estimate > ARGS.rerun_budget:
            rr, ratio, note = f"{'skipped':>12}", f"{'-':>10}", (f"   rerun skipped: estimated {estimate:.0f} s > "
                                                                   f"{ARGS.rerun_budget:.0f} s")
        else:
            ref, _, rdec = rerun(hf, ids, ARGS.new)
            rrate = (ARGS.new - 1) / rdec
            same = same and torch.equal(toks, ref)
            rr, ratio, note = f"{rrate:>12.2f}", f"{rate / rrate:>9.1f}×", ""
        row = (f"{L:>6} {prefill:>10.2f} {rate:>16.2f} {kv_rate:>9.2f} {rr} {rate / kv_rate:>6.1f}× {ratio} "
               f"{'yes' if same else 'NO':>5} {rec_mib:>9.1f} / {kv_mib:>7.1f}{note}")
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
