"""Causal linear attention and GLA forwards side by side: Triton chunked vs torch chunked vs torch parallel.

For each length T, on the same inputs, it times (median of --repeats, after a warm-up) and checks:
  triton     headlab_kernels.linear_attention.triton (CUDA; on CPU only with --interpret, i.e. the slow
             CPU interpreter: a correctness run, its seconds mean nothing)
  chunked    the torch chunked reference (linear_chunked / gla_chunked)
  parallel   the torch `[T, T]` form (linear_parallel / gla_parallel), skipped past --max-parallel-t
  fla        flash-linear-attention's chunk_linear_attn / chunk_gla, when `fla` imports (CUDA only);
             note fla's normalised linear attention adds 1e-5 (ours: eps=1e-6), and its inputs are
             passed as [B, T, H, F] with scale=1
Errors are max |o - o_ref| against the torch parallel form (or, past --max-parallel-t, the chunked
one), also relative to max |o_ref| (unnormalised GLA outputs reach the hundreds), and "×" is time relative to the first method timed. Inputs: q, k = elu(x) + 1 (positive
features), g = logsigmoid(x) (log decays in (-inf, 0)), v standard normal.

Usage: python benchmarks/linear_attention.py [--device cuda|cpu] [--B 1] [--H 4] [--T 256 1024]
       [--F 64] [--D 64] [--chunk 64] [--repeats 5] [--dtype float32|bfloat16] [--interpret]
       [--out benchmarks/results/linear_attention_cpu.txt [--append]] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--F", type=int, default=64)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64, help="chunk of the torch forms and the linear kernel")
    p.add_argument("--gla-chunk", type=int, default=32, help="chunk of the Triton GLA kernel")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--max-parallel-t", type=int, default=4096, help="skip the [T, T] forms past this length")
    p.add_argument("--interpret", action="store_true", help="on CPU, run the Triton kernels under TRITON_INTERPRET=1")
    p.add_argument("--ops", nargs="+", choices=("linear", "gla"), default=["linear", "gla"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    return p.parse_args()


ARGS = _parse()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from headlab_kernels.linear_attention import gla_chunked, gla_parallel, linear_chunked, linear_parallel  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and Triton compilation)
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def _fla_methods(device: str):
    """fla's forwards as functions of our [B, H, T, F] layout, or {} when fla is unusable."""
    if device != "cuda":
        return {}
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # noqa: BLE001 - not installed, or broken: just skip it
        return {}

    def call(fn, *xs, **kw):
        ys = [x.transpose(1, 2).contiguous() for x in xs]  # [B, T, H, F], fla's current layout
        try:
            o = fn(*ys, scale=1.0, **kw)
        except TypeError:  # older fla: head-first layout and a head_first flag
            o = fn(*xs, scale=1.0, head_first=True, **kw)
            return (o[0] if isinstance(o, tuple) else o).float()
        return (o[0] if isinstance(o, tuple) else o).transpose(1, 2).float()

    return {
        "linear": lambda q, k, v: call(chunk_linear_attn, q, k, v, normalize=True),
        "gla": lambda q, k, v, g: call(chunk_gla, q, k, v, g),
    }


def main() -> None:
    args = ARGS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    use_triton = device == "cuda" or args.interpret
    triton_fns = {}
    if use_triton:
        try:
            from headlab_kernels.linear_attention.triton import gla_chunked_triton, linear_chunked_triton
            triton_fns = {"linear": lambda q, k, v: linear_chunked_triton(q, k, v, chunk=args.chunk),
                          "gla": lambda q, k, v, g: gla_chunked_triton(q, k, v, g, chunk=args.gla_chunk)}
        except ImportError as e:
            print(f"# triton unavailable: {e}")
    fla = _fla_methods(device)

    lines = [
        f"# benchmarks/linear_attention.py {' '.join(sys.argv[1:])}",
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}, "
        f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, "
        f"threads {torch.get_num_threads()}, dtype {args.dtype}",
        f"# B={args.B} H={args.H} F={args.F} D={args.D} chunk={args.chunk} (Triton GLA chunk {args.gla_chunk}); "
        f"median of {args.repeats}; err = max |o - o_ref| (ref: torch parallel, else torch chunked), "
        f"rel = err / max |o_ref|",
    ]
    if device == "cpu" and not args.interpret:
        lines.append("# CPU without --interpret: Triton not run (torch forms only)")
    if device == "cpu" and args.interpret:
        lines.append("# triton under the CPU interpreter: a correctness check, its times are not kernel speed")
    print("\n".join(lines), flush=True)

    gen = torch.Generator(device=device).manual_seed(0)
    for T in args.T:
        shape = (args.B, args.H, T, args.F)
        x = [torch.randn(*shape, generator=gen, device=device) for _ in range(3)]
        q = (torch.nn.functional.elu(x[0]) + 1).to(dtype)
        k = (torch.nn.functional.elu(x[1]) + 1).to(dtype)
        g = torch.nn.functional.logsigmoid(x[2]).to(dtype)
        v = torch.randn(args.B, args.H, T, args.D, generator=gen, device=device).to(dtype)
        for op in args.ops:
            ins = (q, k, v) if op == "linear" else (q, k, v, g)
            methods = {}
            if op in triton_fns:
                methods["triton"] = triton_fns[op]
            methods["chunked"] = ((lambda *a: linear_chunked(*a, chunk=args.chunk)) if op == "linear"
                                  else (lambda *a: gla_chunked(*a, chunk=args.chunk)))
            if T <= args.max_parallel_t:
                methods["parallel"] = linear_parallel if op == "linear" else gla_parallel
            if op in fla:
                methods["fla"] = fla[op]
            results = {}
            for name, fn in methods.items():
                try:
                    with torch.no_grad():
                        results[name] = _time(lambda: fn(*ins), device, args.repeats)
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                    results[name] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
            ref_name = "parallel" if results.get("parallel", (None,))[0] is not None else "chunked"
            ref = results[ref_name][1]
            base = next((t for t, _ in results.values() if t is not None), None)
            for name, (t, out) in results.items():
                if t is None:
                    line = f"{op:>6} T={T:>6} {name:>8}: failed: {out}"
                else:
                    if isinstance(ref, torch.Tensor):
                        err = (out.float() - ref.float()).abs().max().item()
                        rel = err / max(ref.float().abs().max().item(), 1e-30)
                    else:
                        err = rel = float("nan")
                    line = (f"{op:>6} T={T:>6} {name:>8}: {t * 1e3:10.3f} ms  ×{t / base:6.2f}  "
                            f"err {err:.2e} (rel {rel:.1e}) vs {ref_name}")
                print(line, flush=True)
                lines.append(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a" if args.append else "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
