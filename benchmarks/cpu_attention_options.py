"""The CPU options for attention with statistics, on one SmolLM2-135M layer's shapes (9 query heads, 3 KV groups, d 64,
causal), each as a ratio to ATen's CPU flash kernel (what sdpa runs; output + lse) timed beside it in one process.

  flash          ATen `_scaled_dot_product_flash_attention_for_cpu`: output + lse (the floor)
  flex           FlexAttention under torch.compile (inductor's CPU template): output only — on the CPU it refuses
                 return_lse (torch 2.13), and a score_mod cannot emit per-row or per-key sums
  kernel-lse     headlab's compiled kernel (headlab_kernels.head_stats.cpu): output + lse
  kernel-all     the same sweep with entropy, received attention and the top-1 key
  torch-rows     the kernel's algorithm in torch ops (row blocks of 64, exact softmax per block, entropy, top-1,
                 received): what fusing those passes into one C++ loop saves

Usage: python benchmarks/cpu_attention_options.py [--lengths 2048 8192] [--repeats 3] [--threads 1]
Timings are the best of `repeats` on a noisy machine; read the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

H, G, D = 9, 3, 64


def _torch_rows(q, k, v, scale, block=64):
    """Row-block attention with all the statistics in torch ops (the kernel's algorithm, unfused)."""
    n_t = q.shape[2]
    kk, vv = (x.repeat_interleave(H // G, 1) for x in (k, v))
    out = torch.empty_like(q)
    received = torch.zeros(q.shape[0], H, n_t)
    ent = torch.empty(q.shape[:3])
    top = torch.empty(q.shape[:3], dtype=torch.long)
    for i0 in range(0, n_t, block):
        i1 = min(n_t, i0 + block)
        s = torch.matmul(q[:, :, i0:i1], kk[:, :, :i1].transpose(-1, -2)) * scale
        s.masked_fill_(torch.arange(i1)[None, :] > torch.arange(i0, i1)[:, None], float("-inf"))
        m, top[:, :, i0:i1] = s.max(-1)
        p = torch.exp(s - m[..., None])
        l_sum = p.sum(-1, keepdim=True)
        p /= l_sum
        lse = m + l_sum[..., 0].log()
        ent[:, :, i0:i1] = lse - (p * s.nan_to_num(0.0, neginf=0.0)).sum(-1)
        received[:, :, :i1] += p.sum(-2)
        out[:, :, i0:i1] = torch.matmul(p, vv[:, :, :i1])
    return out, ent, top, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from headlab_kernels.head_stats import cpu

    if cpu.load() is None:
        raise SystemExit(f"the compiled kernel is not available: {cpu.unavailable()}")
    flex = torch.compile(flex_attention)
    print(f"one SmolLM2-135M layer (H {H}, KV groups {G}, d {D}, causal), {args.threads} thread(s), "
          f"best of {args.repeats}; ratio to ATen's flash kernel")
    for n_t in args.lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, n_t, H, D, generator=g).transpose(1, 2)
        k = torch.randn(1, n_t, G, D, generator=g).transpose(1, 2)
        v = torch.randn(1, n_t, G, D, generator=g).transpose(1, 2)
        scale = D ** -0.5
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n_t, n_t, device="cpu")
        try:
            flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
            lse_note = "flex returns the lse on the CPU"
        except Exception as exc:  # torch 2.13: "return_lse is not supported yet" on the CPU
            lse_note = f"flex with return_lse: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        options = {
            "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1), 0.0, True, scale=scale),
            "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
            "kernel-lse": lambda: cpu.attention_stats(q, k, v, causal=True, scale=scale),
            "kernel-all": lambda: cpu.attention_stats(q, k, v, causal=True, scale=scale, entropy=True, received=True,
                                                      topk=1),
            "torch-rows": lambda: _torch_rows(q, k, v, scale),
        }
        best = {}
        for name, fn in options.items():
            fn()  # warm-up (compiles flex)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
        print(f"T={n_t:6d}  flash {best['flash']:.3f} s  " + "  ".join(
            f"{name} ×{best[name] / best['flash']:.2f}" for name in options if name != "flash"))
        print(f"          {lse_note}")


if __name__ == "__main__":
    main()
