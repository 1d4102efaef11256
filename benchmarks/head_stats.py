"""Streaming head statistics against the anchors: time and peak memory per forward, as ratios to plain sdpa.

Methods, each in its own subprocess so that its peak memory is its own:
  plain      HF forward with sdpa, no analysis (the floor)
  lse        headlab `HeadModel.stats(statistics="lse")`: every head's row log-sum-exp, returned with the output
             by the fused CPU kernel the model's sdpa runs anyway (the induction scan's statistics)
  sets       `statistics={"key_sets"}`: + the mass of every row on two key sets (the first token; a 16-token span),
             from the lse and those keys' scores
  entropy    `statistics={"entropy"}`: + each row's entropy
  received   `statistics={"entropy", "received"}`: + each key's received attention
  top1       `statistics={"entropy", "received", "topk"}`: + each row's top key
             (these three from one sweep of headlab's compiled CPU kernel, route "kernel")
  entropy_flash, received_flash   the same from ATen's flash kernel (route "flash": the keys as extra value columns;
             received from one more flash call with the roles swapped), what runs where the compiled kernel is not built
  stats      headlab `HeadModel.stats` for every head (top-1, lse, entropy, received per key)
  eager      HF eager forward with `output_attentions=True`
  bridge     TransformerBridge `run_with_cache`, patterns only
Models: `smollm2-135m`, and `layer7b` (one Llama layer shaped like a 7B model's: 32 heads, d 128,
hidden 4096, random weights). A method whose patterns would not fit in memory is not started: the
table says how many GiB it would need. Timings are medians of paired runs on a noisy machine; read
the ratios, not the seconds.

Usage: python benchmarks/head_stats.py [--models smollm2-135m layer7b] [--lengths 512 2048 8192 16384]
       [--repeats 3] [--device cpu|cuda] [--kernel-only] [--methods ...] [--paired]
--paired: time only, every method in one process with its forwards interleaved with plain ones (round robin), each
ratio the median of (method / the plain forward beside it): what a busy machine's load cannot skew.
On CUDA it also times the Triton kernel against SDPA (flash) on the same shapes (TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("plain", "lse", "sets", "entropy", "received", "top1", "entropy_flash", "received_flash", "stats", "eager",
           "bridge")
FUSED = {"lse": {"lse"}, "sets": {"key_sets"}, "entropy": {"entropy"}, "received": {"entropy", "received"},
         "top1": {"entropy", "received", "topk"}, "entropy_flash": {"entropy"},
         "received_flash": {"entropy", "received"}}


def _route(method: str) -> str:
    return "flash" if method.endswith("_flash") else "auto"
LAYER7B = dict(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768)


def _folder(model: str) -> Path:
    if model == "smollm2-135m":
        from headlab.models.smollm2 import smollm2_folder

        return smollm2_folder()
    folder = Path(tempfile.gettempdir()) / "headlab-bench-layer7b"
    if not (folder / "config.json").exists():
        import transformers as T

        torch.manual_seed(0)
        T.LlamaForCausalLM(T.LlamaConfig(**LAYER7B)).save_pretrained(folder)
    return folder


def _geometry(folder: Path) -> tuple[int, int]:
    cfg = json.loads((folder / "config.json").read_text())
    return cfg["num_hidden_layers"], cfg["num_attention_heads"]


def _rss_gib() -> float:
    """This process's resident memory now (GiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


class _PeakRss:
    """The highest resident memory seen while the block runs, sampled every 2 ms by a thread (GiB)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_gib(), threading.Event()

        def watch():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_gib())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_gib())


def _one(method: str, model: str, length: int, repeats: int, device: str) -> dict:
    """Run one method in this process; returns median seconds and peak memory growth in GiB (CPU: the highest
    resident memory sampled during the forwards, less the resident memory before them)."""
    import transformers as T

    import headlab as hl

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    folder = _folder(model)
    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    impl = "eager" if method in ("eager", "bridge") else "sdpa"
    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=torch.float32).to(device)
    hf.eval()
    if method == "plain":
        def call():
            with torch.no_grad():
                hf(ids)
    elif method == "stats":
        m = hl.load(hf, device=device)

        def call():
            m.stats(ids, topk=1)
    elif method in FUSED:
        m = hl.load(hf, device=device)
        sets = None
        if method == "sets":
            sets = torch.zeros(2, 1, length, dtype=torch.bool, device=device)
            sets[0, :, 0] = True
            sets[1, :, length // 2:length // 2 + 16] = True

        def call():
            m.stats(ids, statistics=FUSED[method], key_sets=sets, route=_route(method))
    elif method == "eager":
        def call():
            with torch.no_grad():
                hf(ids, output_attentions=True)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        tok = T.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
            __import__("tokenizers").models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok, device=device)

        def call():
            with torch.no_grad():
                bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    else:
        base = _rss_gib()  # resident now, after loading: the forward's peak is measured from here
    times = []
    with _PeakRss() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else rss.peak) - base
    return {"seconds": statistics.median(times), "peak_gib": max(peak, 0.0)}


def _paired(methods: list[str], model: str, length: int, repeats: int, device: str) -> dict[str, float]:
    """Median time ratio to plain of each headlab method, their forwards interleaved with plain ones."""
    import transformers as T

    import headlab as hl

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    ids = torch.randint(10, 1000, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    hf = T.AutoModelForCausalLM.from_pretrained(_folder(model), attn_implementation="sdpa",
                                                dtype=torch.float32).to(device).eval()
    m = hl.load(hf, device=device)
    sets = torch.zeros(2, 1, length, dtype=torch.bool, device=device)
    sets[0, :, 0] = True
    sets[1, :, length // 2:length // 2 + 16] = True
    calls = {"plain": lambda: hf(ids), "stats": lambda: m.stats(ids, topk=1)}
    for name, asked in FUSED.items():
        calls[name] = (lambda asked=asked, name=name: m.stats(ids, statistics=asked, route=_route(name),
                                                               key_sets=sets if name == "sets" else None))
    chosen = [x for x in methods if x in calls and x != "plain"]
    ratios: dict[str, list[float]] = {x: [] for x in chosen}

    def timed(fn) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(calls["plain"])  # warm-up: weights paged in, kernels picked
    for _ in range(repeats):
        for x in chosen:
            before = timed(calls["plain"])
            got = timed(calls[x])
            after = timed(calls["plain"])
            ratios[x].append(got / (0.5 * (before + after)))
    return {x: statistics.median(r) for x, r in ratios.items()}


def _pattern_gib(folder: Path, length: int) -> float:
    layers, heads = _geometry(folder)
    return layers * heads * length * length * 4 / 2**30


def _available_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**30
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def _kernel_vs_sdpa(lengths: list[int]) -> None:
    """Triton head-stats kernel against SDPA (flash) on 7B-layer shapes, fp16/bf16 on CUDA."""
    from headlab_kernels.head_stats import head_stats
    from headlab_kernels.head_stats.triton import attention_stats_triton

    print("\nTriton head_stats, and the fused output + statistics kernel, vs SDPA (flash), B=1, H=32, D=128, bf16, "
          "causal; TFLOP/s counts 4·H·T²·D/2")
    for length in lengths:
        q, k, v = (torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * 32 * length * length * 128 / 2

        def timed(fn, reps=10):
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - start) / reps

        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_stats = timed(lambda: head_stats(q, k, scale=128 ** -0.5, causal=True, impl="triton"))
        t_rows = timed(lambda: attention_stats_triton(q, k, v, scale=128 ** -0.5, causal=True))
        t_all = timed(lambda: attention_stats_triton(q, k, v, scale=128 ** -0.5, causal=True, received=True))
        print(f"  T={length:6d}  sdpa {t_sdpa * 1e3:8.2f} ms ({flops / t_sdpa / 1e12:6.1f} TFLOP/s)  "
              f"head_stats {t_stats * 1e3:8.2f} ms  fused output+row stats {t_rows * 1e3:8.2f} ms "
              f"(×{t_rows / t_sdpa:.2f} of sdpa)  + received {t_all * 1e3:8.2f} ms (×{t_all / t_sdpa:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "layer7b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernel-only", action="store_true")
    parser.add_argument("--paired", action="store_true", help="time ratios from interleaved forwards in one process")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MODEL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired:
        for model in args.models:
            for length in args.lengths:
                ratios = _paired(args.methods, model, length, args.repeats, args.device)
                print(f"{model:>13} T={length:6d} " + "  ".join(f"{k} ×{v:.2f}" for k, v in ratios.items()), flush=True)
        return
    if args.one:
        method, model, length = args.one
        print(json.dumps(_one(method, model, int(length), args.repeats, args.device)))
        return
    if args.device == "cuda" and args.kernel_only:
        _kernel_vs_sdpa(args.lengths)
        return
    print(f"device {args.device}, threads {os.environ.get('BENCH_THREADS', '1')}, "
          f"THP {Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip() if Path('/sys/kernel/mm/transparent_hugepage/enabled').exists() else '?'}")
    rows = []
    for model in args.models:
        folder = _folder(model)
        for length in args.lengths:
            base = None
            for method in args.methods:
                need = _pattern_gib(folder, length) if method in ("eager", "bridge") else 0.0
                if need > 0.8 * _available_gib(args.device):
                    row = {"model": model, "T": length, "method": method,
                           "note": f"not run: its patterns alone need {need:.1f} GiB"}
                else:
                    proc = subprocess.run([sys.executable, __file__, "--one", method, model, str(length),
                                           "--repeats", str(1 if length >= 8192 else args.repeats),
                                           "--device", args.device], capture_output=True, text=True)
                    if proc.returncode != 0:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                        row = {"model": model, "T": length, "method": method, "note": f"failed: {tail}"}
                    else:
                        row = {"model": model, "T": length, "method": method,
                               **json.loads(proc.stdout.strip().splitlines()[-1])}
                if method == "plain" and "seconds" in row:
                    base = row
                if base and "seconds" in row:
                    row["time_ratio"] = row["seconds"] / base["seconds"]
                    row["mem_ratio"] = (row["peak_gib"] / base["peak_gib"]) if base["peak_gib"] > 0 else None
                rows.append(row)
                _print_row(row)
    if args.device == "cuda":
        _kernel_vs_sdpa(args.lengths)
    out = Path("runs/bench_head_stats.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


def _print_row(row: dict) -> None:
    if "seconds" not in row:
        print(f"{row['model']:>13} T={row['T']:6d} {row['method']:>7}: {row['note']}", flush=True)
        return
    ratio = f"time ×{row['time_ratio']:.2f}" if "time_ratio" in row else ""
    mem = f"mem ×{row['mem_ratio']:.2f}" if row.get("mem_ratio") else ""
    print(f"{row['model']:>13} T={row['T']:6d} {row['method']:>7}: {row['seconds']:8.2f} s  peak +{row['peak_gib']:.2f} GiB"
          f"  {ratio} {mem}", flush=True)


if __name__ == "__main__":
    main()
