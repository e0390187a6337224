"""Time and peak memory of lmzoo's two attention backends, ``sdpa`` and ``reference``.

Causal self-attention with GPT-2 small's head shapes (12 heads of 64 channels) at several
sequence lengths. Prints one JSON line per (backend, T), then one line per T with the largest
absolute difference between the two outputs.

Peak memory is read from the PyTorch profiler's allocation records (``profile_memory=True``):
the largest running sum of bytes allocated minus bytes freed inside the call, the output included
(``output_mib``; ``score_matrix_mib`` is the size of the (B, heads, T, T) score tensor).
That counts tensors made by PyTorch's CPU allocator; ``tracemalloc`` would see none of them.

    python benchmarks/attention_backends.py                 # CPU, T = 256 1024 2048
    python benchmarks/attention_backends.py --device cuda --dtype bfloat16 --seq 1024 4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from lmzoo.layers.attention import attend


def peak_cpu_bytes(fn) -> int:
    """Largest net CPU allocation (bytes) while ``fn()`` runs, from the profiler's memory records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_cuda_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def time_ms(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = args.device, getattr(torch, args.dtype)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
    }
    peak = peak_cuda_bytes if device == "cuda" else peak_cpu_bytes
    gen = torch.Generator().manual_seed(0)
    for T in args.seq:
        shape = (args.batch, args.heads, T, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
        outputs = {}
        for backend in ("sdpa", "reference"):
            with torch.inference_mode():
                run = partial(attend, q, k, v, is_causal=True, backend=backend)
                outputs[backend] = run().float()
                ms = time_ms(run, device, args.repeats)
                peak_bytes = peak(run)
            size = torch.empty((), dtype=dtype).element_size()
            score_matrix, output = args.batch * args.heads * T * T * size, q.numel() * size
            print(json.dumps({
                "bench": "attention_backends", "backend": backend, "T": T, "shape": list(shape),
                "ms": round(ms, 3), "peak_mib": round(peak_bytes / 2**20, 2),
                "output_mib": round(output / 2**20, 2),
                "score_matrix_mib": round(score_matrix / 2**20, 2), **env,
            }))
        diff = (outputs["sdpa"] - outputs["reference"]).abs().max().item()
        print(json.dumps({"bench": "attention_backends", "T": T, "max_abs_diff": diff, **env}))


if __name__ == "__main__":
    main()
