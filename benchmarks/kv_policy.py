"""RazorAttention's KV policy as a real cache (RazorCache) against the full KV cache, on SmolLM2-135M.

For each prompt length L, each condition runs in a fresh subprocess (so its peak RSS is its own): load the model,
prefill a KJV prompt of L tokens (the last token held back), then greedy-decode `--new` tokens one forward each.

  full   transformers' DynamicCache: every KV head keeps every token;
  razor  RazorCache (headlab.edits.razor_cache) with RazorAttention's policy: the retrieval KV heads of an
         echo/induction scan (RazorParams defaults: 14% of KV heads by induction score + 1% by echo) keep every
         token; every other KV head keeps 4 sink tokens, a window of --window tokens and one compensation token
         (compressed layer by layer as soon as the prompt has passed it).

Reported: prefill seconds, decode tokens/s (the steps after the first, both caches decoding in one process with
their steps interleaved, so the machine's load hits both alike), the peak memory of the run above what the
loaded model holds (RSS sampled every 5 ms from /proc/self/statm during prefill and decode, minus the RSS after
loading and one short warm-up forward: the prefill's activations and the cache), the bytes the cache holds after the last step, and whether the
greedy tokens equal the full cache's (Razor is lossy: they may differ). Ratios razor / full are side by side from one
run of this script.

Usage: python benchmarks/kv_policy.py [--lengths 4096 8160] [--new 32] [--window 256] [--threads 1]
       [--out benchmarks/results/kv_policy_cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8160])
    p.add_argument("--new", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--window", type=int, default=256, help="RazorAttention's recent window S0")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON job of one subprocess
    return p.parse_args(argv)


def _prompt(model, length: int):
    import torch

    from headlab.analyses.retrieval import needle_sets

    text = needle_sets()[0].haystack
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _Peak:
    """The highest RSS seen by a sampling thread while the `with` block runs."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def child(job: dict) -> dict:
    """One condition in this process: prefill, decode, measure."""
    import gc

    import torch

    import headlab as hl
    from headlab.edits import RazorKV

    torch.set_num_threads(job["threads"])
    model = hl.load("smollm2-135m")
    ids = _prompt(model, job["length"])
    cache = None
    if job["condition"] == "razor":
        full = frozenset(tuple(x) for x in job["full"])
        cache = RazorKV(full=full, sinks=4, window=job["window"]).cache(model)
    with torch.no_grad():  # touch every weight first (safetensors are mapped lazily: pages fault in on first use)
        model.forward_cached(ids[:, :8])
    gc.collect()
    base = _rss_mb()
    with torch.no_grad(), _Peak() as peak:
        t0 = time.perf_counter()
        logits, cache = model.forward_cached(ids[:, :-1], cache)
        prefill = time.perf_counter() - t0
        token, out = int(ids[0, -1]), []
        t0 = time.perf_counter()
        for i in range(job["new"]):
            if i == 1:
                t0 = time.perf_counter()
            logits, cache = model.forward_cached(torch.tensor([[token]]), cache)
            token = int(logits.argmax())
            out.append(token)
        decode = time.perf_counter() - t0
    if job["condition"] == "razor":
        held = cache.nbytes()
    else:
        held = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in cache.layers)
    return {"prefill_s": prefill, "decode_tok_s": (job["new"] - 1) / decode, "tokens": out,
            "peak_mb": peak.peak - base, "cache_mb": held / 2**20}


def speed(length: int, new: int, window: int, full: list, threads: int) -> dict[str, float]:
    """Decode tokens/s of both caches in one process, their steps interleaved (the machine's load hits both alike)."""
    import torch

    import headlab as hl
    from headlab.edits import RazorKV

    torch.set_num_threads(threads)
    model = hl.load("smollm2-135m")
    ids = _prompt(model, length)
    policy = RazorKV(full=frozenset(tuple(x) for x in full), sinks=4, window=window)
    caches = {}
    with torch.no_grad():
        for name, cache in (("full", None), ("razor", policy.cache(model))):
            _, caches[name] = model.forward_cached(ids[:, :-1], cache)
            _, caches[name] = model.forward_cached(ids[:, -1:], caches[name])  # the first step (compresses)
        spent = {"full": 0.0, "razor": 0.0}
        for _ in range(new - 1):
            for name in ("full", "razor"):
                t0 = time.perf_counter()
                _, caches[name] = model.forward_cached(torch.tensor([[5]]), caches[name])
                spent[name] += time.perf_counter() - t0
    return {name: (new - 1) / t for name, t in spent.items()}


def main() -> int:
    args = _parse()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import torch

    import headlab as hl
    from headlab.analyses.razor import RazorParams, echo_induction_scan, retrieval_kv_heads

    torch.set_num_threads(args.threads)
    model = hl.load("smollm2-135m")
    t0 = time.perf_counter()
    full = sorted(retrieval_kv_heads(echo_induction_scan(model, RazorParams(), progress=False)))
    scan_s = time.perf_counter() - t0
    del model
    lines = [f"# RazorCache vs the full KV cache, smollm2-135m — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
             f"{args.new} new tokens; window {args.window}, 4 sinks, compensation token",
             f"# retrieval KV heads kept full: {len(full)} of 90 (echo/induction scan, {scan_s:.1f} s)",
             "", "| L | condition | prefill s | decode tok/s | peak MB above the model | cache MB | same tokens as full |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for length in args.lengths:
        res = {}
        for cond in ("full", "razor"):
            job = {"length": length, "condition": cond, "new": args.new, "window": args.window,
                   "threads": args.threads, "full": full}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"{cond} at {length} failed:\n{proc.stderr[-3000:]}")
            res[cond] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"L={length} {cond}: peak +{res[cond]['peak_mb']:.0f} MB", flush=True)
        tok_s = speed(length, args.new, args.window, full, args.threads)
        for cond in ("full", "razor"):
            res[cond]["decode_tok_s"] = tok_s[cond]
        same = res["full"]["tokens"] == res["razor"]["tokens"]
        for cond in ("full", "razor"):
            r = res[cond]
            lines.append(f"| {length} | {cond} | {r['prefill_s']:.1f} | {r['decode_tok_s']:.2f} | "
                         f"{r['peak_mb']:.0f} | {r['cache_mb']:.1f} | {'—' if cond == 'full' else same} |")
        ratios.append(f"L={length}: peak memory ×{res['razor']['peak_mb'] / res['full']['peak_mb']:.2f}, "
                      f"cache ×{res['razor']['cache_mb'] / res['full']['cache_mb']:.3f}, decode speed "
                      f"×{res['razor']['decode_tok_s'] / res['full']['decode_tok_s']:.2f} (razor / full)")
    report = "\n".join(lines + ["", *ratios]) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
