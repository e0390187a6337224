"""Mamba's scans on CPU: training speed, memory against length, and decoding cost per token.

Prints JSON lines:

- ``speed``: forward + backward of one Mamba layer (d_model 256, d_state 16, batch 4) with the
  chunked parallel scan and with the sequential reference, wall time and CPU time (best of
  ``--repeat``), at each ``--lengths``; ``speedup`` = sequential / parallel.
- ``memory``: bytes autograd saves for backward (exact, via saved-tensor hooks) for both scans,
  and the peak resident memory of a fresh process running the parallel scan's forward + backward,
  at each length; ``per_token`` shows the growth is linear.
- ``decode``: milliseconds per generated token of a small Mamba LM (and, for contrast, a GPT of the
  same width with a KV cache) after 256 and after 4096 generated tokens.

    python benchmarks/mamba_scan.py                      # everything (a few minutes on 2 cores)
    python benchmarks/mamba_scan.py --only speed --lengths 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import lmzoo
from lmzoo.layers import ssm
from lmzoo.layers.ssm import SelectiveSSM

_SCAN = ssm.selective_scan

D_MODEL, D_STATE, BATCH = 256, 16, 4


def layer(scan: str, seed: int = 0) -> SelectiveSSM:
    torch.manual_seed(seed)
    return SelectiveSSM(D_MODEL, D_STATE, scan=scan)


def fwd_bwd(m: SelectiveSSM, x: torch.Tensor) -> None:
    m(x).square().mean().backward()


def _no_scan(u, delta, A, B, C, h0=None, chunk=8, segment=32):
    """A stand-in with the scan's inputs and output shape but (almost) no cost: the Amdahl bound."""
    return (u * delta).float() * B.sum(-1, keepdim=True) * C.sum(-1, keepdim=True), None


def speed(T: int, repeat: int) -> dict:
    """Both scans, plus the layer with the scan replaced by :func:`_no_scan` (``no_scan_ms``): the
    projections, convolution and gate alone, so ``speedup_bound`` = sequential / no_scan is the
    most any scan could give for the whole layer on this machine."""
    x = torch.randn(BATCH, T, D_MODEL, requires_grad=True)
    out = {"bench": "speed", "T": T, "d_model": D_MODEL, "d_state": D_STATE, "batch": BATCH,
           "threads": torch.get_num_threads()}
    best = {}
    for _ in range(repeat):  # interleaved, so both see the same machine load
        for scan in ("chunked", "sequential", "no_scan"):
            m = layer("sequential" if scan == "sequential" else "chunked")
            ssm.selective_scan = _no_scan if scan == "no_scan" else _SCAN
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(m, x)
            ssm.selective_scan = _SCAN
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            w, c = best.get(scan, (float("inf"), float("inf")))
            best[scan] = (min(w, wall), min(c, cpu))
    for scan, (w, c) in best.items():
        out[f"{scan}_ms"], out[f"{scan}_cpu_ms"] = round(1000 * w, 1), round(1000 * c, 1)
    out["speedup"] = round(best["sequential"][0] / best["chunked"][0], 2)
    out["speedup_cpu_time"] = round(best["sequential"][1] / best["chunked"][1], 2)
    out["speedup_bound"] = round(best["sequential"][0] / best["no_scan"][0], 2)
    return out


def saved_bytes(scan: str, T: int) -> int:
    """Bytes of the tensors autograd keeps for backward (distinct storages counted once)."""
    m, x = layer(scan), torch.randn(BATCH, T, D_MODEL, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    del y
    return sum(seen.values())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_child(T: int) -> None:
    """(run in a fresh process, Linux) forward + backward at length T; print the peak RSS growth in bytes."""
    m, x = layer("chunked"), torch.randn(BATCH, T, D_MODEL, requires_grad=True)
    fwd_bwd(m, x)  # warm-up: allocator pools, thread pools
    m.zero_grad(set_to_none=True)
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fwd_bwd(m, x)
    print((_status_kb("VmHWM") - before) * 1024)


def memory(T: int) -> dict:
    rss = subprocess.run([sys.executable, __file__, "--rss-child", str(T)], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    par, seq = saved_bytes("chunked", T), saved_bytes("sequential", T)
    return {"bench": "memory", "T": T, "saved_for_backward_chunked_mb": round(par / 2**20, 1),
            "saved_for_backward_sequential_mb": round(seq / 2**20, 1),
            "saved_per_token_chunked_kb": round(par / T / 1024, 1),
            "peak_rss_growth_chunked_mb": round(int(rss) / 2**20, 1)}


@torch.inference_mode()
def decode_ms_per_token(model, n_new: int, window: int = 64) -> float:
    """Mean time of the last ``window`` decoding steps after ``n_new`` generated tokens."""
    cache = model.init_cache(1, n_new + 8)
    tok = torch.zeros(1, 8, dtype=torch.long)
    model(tok, cache=cache)
    nxt = tok[:, -1:]
    for _ in range(n_new - window):
        nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(window):
        nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
    return 1000 * (time.perf_counter() - t0) / window


def decode(lengths: list[int]) -> list[dict]:
    torch.manual_seed(0)
    models = {
        "mamba": lmzoo.build("mamba-debug", n_layer=4, n_embd=D_MODEL, d_state=D_STATE,
                             vocab_size=256).eval(),
        "gpt2-kv-cache": lmzoo.build("gpt2-debug", n_layer=4, n_embd=D_MODEL, n_head=4, n_kv_head=4,
                                     pos_emb="rope", vocab_size=256, block_size=max(lengths) + 8).eval(),
    }
    out = []
    for name, m in models.items():
        row = {"bench": "decode", "model": name, "params": m.num_params()}
        for n in lengths:
            row[f"ms_per_token_at_{n}"] = round(decode_ms_per_token(m, n), 3)
            row[f"cache_mb_at_{n}"] = round(m.init_cache(1, n + 8).nbytes / 2**20, 3)
        first, last = row[f"ms_per_token_at_{lengths[0]}"], row[f"ms_per_token_at_{lengths[-1]}"]
        row["ratio_last_to_first"] = round(last / first, 2)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["speed", "memory", "decode"], default=None)
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[256, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        return peak_rss_child(args.rss_child)
    if args.only in (None, "speed"):
        for T in args.lengths:
            print(json.dumps(speed(T, args.repeat)), flush=True)
    if args.only in (None, "memory"):
        for T in args.memory_lengths:
            print(json.dumps(memory(T)), flush=True)
    if args.only in (None, "decode"):
        for row in decode(args.decode_lengths):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
