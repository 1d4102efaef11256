"""Mixture-of-Head attention: dense attention then the gate multiply vs the routed path that skips unrouted heads.

For each length T and each share of active heads (exactly k of H heads on per token, chosen at random
per token, gate values uniform in [0.1, 1)), on the same inputs, it times (median of --repeats paired
runs, after a warm-up) and checks:
  dense    torch sdpa(q, k, v, is_causal=True, enable_gqa=True), transposed to [B, T, H, D], times the gates
  routed   headlab_kernels.routed_attention.routed_torch (only the active rows, per (batch, kv group)
           position blocks of --block tokens)
  triton   headlab_kernels.routed_attention.triton.routed_triton (CUDA only)
and reports the FLOPs ratio routed / dense and the decode KV-read fraction from `routed_costs`
(exact counts from the gates), the measured time ratio (median routed / median dense) and
max |routed - dense|. Defaults: B=1, H=9, G=3, D=64 (SmolLM2-135M's attention), float32.

Usage: python benchmarks/moh.py [--lengths 256 1024 2048] [--fractions 0.25 0.5 0.75 1.0] [--heads 9]
       [--groups 3] [--dim 64] [--batch 1] [--repeats 7] [--threads 2] [--device cpu|cuda] [--block 128]
       [--out benchmarks/results/moh_cpu.txt] [--quick]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from headlab_kernels.routed_attention import routed_costs, routed_torch  # noqa: E402


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="share of heads on per token (k = round(fraction · H), at least 1)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--groups", type=int, default=3, help="key/value heads (GQA groups)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--block", type=int, default=128, help="position block of the torch routed path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="also write the report here (default with no --quick: benchmarks/results/moh_<device>.txt)")
    p.add_argument("--quick", action="store_true", help="a smoke run: T 64 128, fractions 0.5 1.0, 1 repeat, no file")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.fractions, args.repeats = [64, 128], [0.5, 1.0], 1
    if args.heads % args.groups:
        p.error(f"--heads {args.heads} is not a multiple of --groups {args.groups}")
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gates(B: int, T: int, H: int, k: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Exactly k of H heads on per token, chosen at random; gate values uniform in [0.1, 1)."""
    heads = torch.rand(B, T, H, generator=gen, device=device).argsort(-1)[..., :k]
    values = torch.rand(B, T, k, generator=gen, device=device) * 0.9 + 0.1
    return torch.zeros(B, T, H, device=device).scatter_(-1, heads, values)


def _time_paired(fns: dict, device: str, repeats: int) -> dict:
    """Median seconds of each function; the functions take turns within each repeat (paired runs)."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up (and Triton compilation)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), outs[name]) for name, ts in times.items()}


def main(argv=None) -> list[str]:
    args = _parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    triton_fn = None
    if device == "cuda":
        try:
            from headlab_kernels.routed_attention.triton import routed_triton as triton_fn
        except ImportError as e:
            print(f"# triton unavailable: {e}")
    B, H, G, D = args.batch, args.heads, args.groups, args.dim
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# benchmarks/moh.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, device {device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, "
        f"threads {torch.get_num_threads()}, float32",
        f"# B={B} H={H} G={G} D={D}; exactly k of H heads on per token (random per token), gates in [0.1, 1); "
        f"median of {args.repeats} paired repeats after a warm-up",
        "# dense = sdpa(is_causal, enable_gqa) then x gates; routed = routed_torch(block="
        f"{args.block}); FLOPs ratio and KV-read fraction (decode: a group's cache is read for a token when one "
        "of its heads is on) from routed_costs; time = median routed / median dense; err = max |routed - dense|",
    ]
    if device == "cpu":
        lines.append("# CPU: Triton not run (the interpreter's times are not kernel speed)")
    cols = (f"{'T':>5} {'k/H':>5} {'FLOPs':>6} {'KVread':>6} {'dense ms':>9} {'routed ms':>9} {'time':>6} "
            f"{'err':>8}" + (f" {'triton ms':>9} {'time':>6} {'err':>8}" if triton_fn else ""))
    lines.append(cols)
    print("\n".join(lines), flush=True)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    for T in args.lengths:
        q = torch.randn(B, H, T, D, generator=gen, device=device)
        k = torch.randn(B, G, T, D, generator=gen, device=device)
        v = torch.randn(B, G, T, D, generator=gen, device=device)
        for frac in args.fractions:
            kh = max(1, min(H, round(frac * H)))
            gates = _gates(B, T, H, kh, gen, device)
            costs = routed_costs(gates, G, D)

            def dense():
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                return o.transpose(1, 2) * gates[..., None]

            fns = {"dense": dense, "routed": lambda: routed_torch(q, k, v, gates, block=args.block)}
            if triton_fn is not None:
                fns["triton"] = lambda: triton_fn(q, k, v, gates)
            with torch.no_grad():
                res = _time_paired(fns, device, args.repeats)
            t_dense, ref = res["dense"]
            row = (f"{T:>5} {f'{kh}/{H}':>5} {costs['flops_ratio']:>6.3f} {costs['kv_read_fraction']:>6.3f} "
                   f"{t_dense * 1e3:>9.2f}")
            for name in ("routed", "triton") if triton_fn else ("routed",):
                t, out = res[name]
                err = (out.float() - ref.float()).abs().max().item()
                row += f" {t * 1e3:>9.2f} {t / t_dense:>6.2f} {err:>8.1e}"
            print(row, flush=True)
            lines.append(row)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shared = " (a CPU shared with other jobs: read the ratios, not the milliseconds)" if device == "cpu" else ""
    lines.insert(2, f"# 1-minute load average {load:.2f} at the start, {end_load:.2f} at the end{shared}")
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).resolve().parent / "results" / f"moh_{device}.txt"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"# wrote {out}")
    return lines


if __name__ == "__main__":
    main()
