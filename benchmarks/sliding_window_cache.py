"""KV-cache memory vs generated length, with and without sliding-window attention (rolling cache).

A small Mistral-style model (window ``--window``) generates greedily to each length with
``lmzoo.generate``'s cache (a RollingKVCache: one ring of ``window`` slots per layer), and the
same weights generate with a full-length KVCache (``init_cache(..., rollback=True)``: a cache that can
roll back is never a ring; masks with the same window).
Both must give the same tokens (``same_tokens``). Memory is the bytes each cache allocated,
read from the cache object (the buffers are allocated once, never grown).
A last line gives the allocation for the real Mistral 7B shapes in bf16 (built on the meta device).

    python benchmarks/sliding_window_cache.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import lmzoo
from lmzoo.decoding.generate import sample_next


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, n: int, rolling: bool) -> tuple[list[int], int, float]:
    """Greedy tokens, the cache's allocated bytes, and seconds; the cache is sized for the full length."""
    cache = model.init_cache(1, prompt.shape[1] + n, rollback=not rolling)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache, last_only=True).logits[:, -1]
    out = []
    for _ in range(n):
        nxt = sample_next(logits, temperature=0.0)
        out.append(int(nxt))
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out, cache.nbytes, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lmzoo.build("mistral-debug", n_layer=4, n_embd=128, n_head=4, n_kv_head=2, mlp_hidden=256,
                        sliding_window=args.window, block_size=max(args.lengths) + 16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    env = {"torch": torch.__version__, "device": f"cpu ({os.cpu_count()} cores)",
           "threads": torch.get_num_threads()}
    for n in args.lengths:
        roll_tok, roll_bytes, roll_s = greedy(model, prompt, n, rolling=True)
        full_tok, full_bytes, full_s = greedy(model, prompt, n, rolling=False)
        print(json.dumps({
            "bench": "sliding_window_cache", **env, "window": args.window, "generated": n,
            "rolling_cache_bytes": roll_bytes, "full_cache_bytes": full_bytes,
            "rolling_tokens_per_s": round(n / roll_s), "full_tokens_per_s": round(n / full_s),
            "same_tokens": roll_tok == full_tok,
        }))
    with torch.device("meta"):
        mistral = lmzoo.build("mistral-7b")
    row = {"bench": "sliding_window_cache", "model": "mistral-7b (shapes only)", "dtype": "bfloat16"}
    for n in (4096, 32768):
        for kind, rolling in (("rolling", True), ("full", False)):
            cache = mistral.init_cache(1, n, dtype=torch.bfloat16, device="meta", rollback=not rolling)
            row[f"{kind}_GiB_at_{n}"] = cache.nbytes / 2**30
    print(json.dumps(row))


if __name__ == "__main__":
    main()
