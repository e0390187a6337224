"""Peak memory and time of the LM head + cross-entropy (forward + backward): plain vs chunked.

    python benchmarks/chunked_ce_memory.py [--tokens 4096] [--chunk 1024] [--device cpu]

Each variant runs in a fresh subprocess (CPU: peak RSS growth; CUDA: max_memory_allocated), GPT-2's
head shape (768 -> 50,304), float32 hidden states. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def one(variant: str, tokens: int, chunk: int, device: str) -> dict:
    import torch

    from lmzoo.layers.chunked_ce import linear_cross_entropy
    from lmzoo.models.base import lm_loss

    torch.manual_seed(0)
    h = torch.randn(tokens, 768, device=device, requires_grad=True)
    w = (torch.randn(50304, 768, device=device) * 0.02).requires_grad_()
    y = torch.randint(0, 50257, (tokens,), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if variant == "plain":
        loss = lm_loss((h @ w.t())[:, :50257], y)
    else:
        loss = linear_cross_entropy(h, w, y, chunk=chunk, vocab_size=50257)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rec = {"variant": variant, "tokens": tokens, "chunk": chunk if variant == "chunked" else None, "device": device,
           "loss": float(loss), "seconds": dt, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        rec["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        rec["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(one(a.variant, a.tokens, a.chunk, a.device)))
        return
    for v in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--variant", v, "--tokens", str(a.tokens), "--chunk", str(a.chunk),
               "--device", a.device]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
