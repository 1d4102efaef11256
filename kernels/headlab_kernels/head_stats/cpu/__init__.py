"""The CPU fused kernel: attention output, lse, entropy, top-k, key-set masses and received attention in one sweep.

`attention_stats.cpp` (beside this file) is a C++ extension built with the machine's own compiler
(`torch.utils.cpp_extension`, OpenMP through ATen's `parallel_for`, BLAS through ATen's `cpublas::gemm`). It sweeps
blocks of query rows, scoring each block against its whole visible key range at once, so every row's softmax is
exact in two passes over its scores and its normalised weights can be added into each key's received attention in
the same sweep: no second pass over the query–key pairs, no T×S matrix (a BQ×S buffer per thread).

It is built once per machine into headlab's cache folder (`make install` builds it; `python -m
headlab_kernels.head_stats.cpu` builds it by hand and says where) and loaded on first use. Where it cannot be built
(no compiler, no ninja), `load()` returns None, `unavailable()` says why, and callers take the ATen-flash route of
`headlab_kernels.head_stats.fused` or the chunked torch reference: the torch reference stays the specification.
Set HEADLAB_CPU_KERNEL=0 to never build or use it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["load", "unavailable", "attention_stats", "build_dir", "BLOCK_Q"]

SOURCE = Path(__file__).with_name("attention_stats.cpp")
#: Query rows per block: each thread holds BLOCK_Q × S float32 scores (4 MiB at S = 16384); 64 was the fastest of
#: 16 / 32 / 64 / 128 at 2k–16k on a SmolLM2 layer.
BLOCK_Q = 64
#: The sentinel lse the kernel writes for a row that sees no key (the wrapper turns it into -inf).
_NEG_LSE = -1.0e29

_lock = threading.Lock()
_module: Any = None
_error: str | None = None


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the instruction sets it was built for."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build_dir() -> Path:
    """Where the extension is built: `$HEADLAB_CACHE/kernels/…` (default: the user cache folder), one folder per
    torch version, source and CPU."""
    from platformdirs import user_cache_dir

    root = Path(os.environ.get("HEADLAB_CACHE") or user_cache_dir("headlab"))
    src = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    tv = torch.__version__.split("+")[0]
    return root / "kernels" / f"attention_stats-torch{tv}-py{sys.version_info[0]}{sys.version_info[1]}-{src}-{_cpu_key()}"


def load(verbose: bool = False) -> Any:
    """The compiled extension module, building it on first call (tens of seconds, once per machine); None where it
    cannot be built or HEADLAB_CPU_KERNEL=0 (then `unavailable()` says why)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("HEADLAB_CPU_KERNEL", "1") == "0":
            _error = "disabled by HEADLAB_CPU_KERNEL=0"
            return None
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if compiler is None:
            _error = "no C++ compiler on PATH (c++ / g++ / $CXX)"
            return None
        # torch wants `ninja` on PATH: the one in this environment's bin folder (the `ninja` wheel) counts too
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        if shutil.which("ninja") is None:
            _error = "ninja is not installed (pip install ninja)"
            return None
        try:
            from torch.utils.cpp_extension import load as cpp_load

            where = build_dir()
            try:
                where.mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only cache folder: build in the temporary folder instead
                import tempfile

                where = Path(tempfile.gettempdir()) / "headlab-kernels" / where.name
                where.mkdir(parents=True, exist_ok=True)
            _module = cpp_load(name="headlab_attention_stats", sources=[str(SOURCE)], build_directory=str(where),
                               extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=verbose)
        except Exception as exc:  # a failed build leaves the torch routes
            _error = f"building {SOURCE.name} failed: {type(exc).__name__}: {str(exc).strip()[-400:]}"
            _module = None
        return _module


def unavailable() -> str | None:
    """Why the compiled kernel is not in use (None when it is, or when `load` has not been tried yet)."""
    return _error


def attention_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                    causal: bool, scale: float, entropy: bool = False, topk: int = 0,
                    features: torch.Tensor | None = None, received: bool = False,
                    query_mask: torch.Tensor | None = None, block_q: int = BLOCK_Q
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """softmax(scale · q kᵀ) v with the statistics asked for, from one sweep of the compiled kernel.

    Args:
        q: float32 `[B, H, Q, D]`; k: `[B, Hkv, S, D]`; v: `[B, Hkv, S, Dv]` (query head h reads kv head
            h // (H // Hkv): no expanded copy of the KV groups is needed). Any strides with a contiguous last dim.
        mask: bool `[B|1, 1|H, Q, S]`, True = may attend (intersected with `causal`).
        causal: query i sees keys j <= i + S - Q.
        scale: the softmax scale.
        entropy: each row's entropy in nats.
        topk: how many top keys per row (0: none).
        features: float32 `[B, S, K]`: each row's weighted sum of them (key-set indicators give the set masses).
        received: each key's attention summed over the real queries.
        query_mask: bool `[B, Q]` of the real queries (for `received`).
        block_q: query rows per block.

    Returns:
        (output `[B, Q, H, Dv]` — the layout the model's attention returns —, {"lse" `[B, H, Q]` (-inf: no key
        seen), and "entropy", "topk_idx" / "topk_weight" `[B, H, Q, topk]`, "set_mass" `[B, H, Q, K]`, "received"
        `[B, H, S]` as asked}), or None where the kernel is not available.
    """
    mod = load()
    if mod is None:
        return None
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    qm = None if query_mask is None else query_mask.to(torch.bool)
    feats = None if features is None else features.float()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse, ent, tk_idx, tk_w, setm, rcv = mod.attention_stats(q, k, v, mask, bool(causal), float(scale),
                                                                 bool(entropy), int(topk), feats, bool(received),
                                                                 qm, int(block_q))
    stats = {"lse": lse.masked_fill(lse < _NEG_LSE, float("-inf"))}
    if entropy:
        stats["entropy"] = ent
    if topk:
        stats["topk_idx"], stats["topk_weight"] = tk_idx, tk_w
    if features is not None:
        stats["set_mass"] = setm
    if received:
        stats["received"] = rcv
    return out, stats

