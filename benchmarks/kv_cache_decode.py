"""Greedy decoding speed with and without the KV cache, and what the cache costs in memory.

With the cache: ``lmzoo.generate`` (one prefill over the prompt, then one token per forward).
Without: every step runs the model over the whole prefix again and keeps the last logits, the
way a model without decoding state has to. Both are greedy, so they must produce the same
tokens (reported as ``same_tokens``). Then one line checks left padding: two prompts of
different lengths decoded as one batch against each decoded alone.

    python benchmarks/kv_cache_decode.py                         # small model, 64/256/512 tokens
    python benchmarks/kv_cache_decode.py --preset gpt2 --new 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import lmzoo
from lmzoo.decoding.generate import left_pad


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = []
    for _ in range(n):
        nxt = model(ids, last_only=True).logits[:, -1].argmax(-1)  # recompute all T positions
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


@torch.inference_mode()
def left_pad_check(model, prompts: list[list[int]], n: int) -> dict:
    """Batched (left-padded) vs one-row-at-a-time: prefill logits and greedy tokens."""
    ids, pad = left_pad(prompts)
    cache = model.init_cache(len(prompts), ids.shape[1], pad=pad)
    batched = model(ids.to(model.device), cache=cache, last_only=True).logits[:, -1]
    diff = 0.0
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p], device=model.device), last_only=True).logits[:, -1]
        diff = max(diff, (batched[b] - alone[0]).abs().max().item())
    together = lmzoo.generate(model, prompts, n, temperature=0)
    apart = [lmzoo.generate(model, [p], n, temperature=0)[0] for p in prompts]
    return {"pad": pad.tolist(), "prefill_logits_max_abs_diff": diff, "same_tokens": together == apart}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-char-cpu")
    ap.add_argument("--override", nargs="*", default=["n_embd=256", "n_head=4", "block_size=1024"],
                    help="config fields, key=value")
    ap.add_argument("--new", type=int, nargs="+", default=[64, 256, 512], help="tokens to generate")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    overrides = dict(kv.split("=", 1) for kv in args.override)
    model = lmzoo.build(args.preset, **overrides).to(args.device).eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "model": args.preset, "overrides": overrides, "params": model.num_params(),
    }
    lmzoo.generate(model, [prompt], 8, temperature=0)  # warm-up
    for n in args.new:
        sync(args.device)
        t0 = time.perf_counter()
        cached = lmzoo.generate(model, [prompt], n, temperature=0)[0]
        sync(args.device)
        t_cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        uncached = decode_without_cache(model, prompt, n)
        sync(args.device)
        t_full = time.perf_counter() - t0
        cache = model.init_cache(1, args.prompt_len + n)
        print(json.dumps({
            "bench": "kv_cache_decode", "prompt": args.prompt_len, "new_tokens": n,
            "tok_s_cache": round(n / t_cache, 1), "tok_s_no_cache": round(n / t_full, 1),
            "speedup": round(t_full / t_cache, 2), "same_tokens": cached == uncached,
            "cache_bytes": cache.nbytes, "cache_bytes_per_token": cache.nbytes // (args.prompt_len + n),
            "dtype": str(cache.k.dtype).removeprefix("torch."), **env,
        }))
    prompts = [prompt[:5], prompt[:12]]
    print(json.dumps({"bench": "kv_cache_left_pad", "lengths": [len(p) for p in prompts],
                      **left_pad_check(model, prompts, 32), **env}))


if __name__ == "__main__":
    main()
