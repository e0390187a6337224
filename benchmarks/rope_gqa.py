"""RoPE and grouped-query attention: numeric checks, throughput, KV-cache size.

Prints one JSON line per measurement:

- ``rope_relative``: q·k after RoPE at positions (m, m - delta) for every m up to ``--max-pos``;
  the spread (max - min) over m for fixed delta, with lmzoo's float32 tables and in float64.
- ``rope_layouts``: Meta's interleaved RoPE vs lmzoo's rotate-half RoPE after permuting the
  q/k projection rows with the Llama converter's ``meta_to_rotate_half``; the largest
  difference of the attention scores.
- ``rope_throughput``: forward tokens/s of the same model with learned positions vs RoPE.
- ``gqa_cache_bytes``: KV-cache bytes per token of ``gpt2`` and ``gpt2-improved`` (meta device).
- ``gqa_kernel``: one decode step's attention in one layer, lmzoo's ``repeat_kv`` + SDPA vs
  SDPA's own ``enable_gqa``, for n_kv_head = n_head, n_head/4, 1.
- ``gqa_decode``: greedy decoding tokens/s of one model with n_kv_head = n_head, n_head/4, 1.

    python benchmarks/rope_gqa.py
    python benchmarks/rope_gqa.py --only rope_relative rope_layouts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.formats.hf.llama import meta_to_rotate_half
from lmzoo.layers.attention import attend, repeat_kv
from lmzoo.layers.rope import RotaryEmbedding, apply_rope, rope_frequencies

SMALL = dict(n_layer=4, n_head=8, n_embd=512, block_size=1024, vocab_size=65, mlp="gelu")


def emit(env: dict, **fields) -> None:
    print(json.dumps({**fields, **env}), flush=True)


def rope_relative(env: dict, head_dim: int, max_pos: int) -> None:
    """Spread of q·k over all position pairs with the same offset: zero in exact arithmetic."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g).unbind(0)
    m = torch.arange(max_pos)
    # float32: lmzoo's own tables, exactly as the model uses them
    rope = RotaryEmbedding(head_dim, max_pos)
    # float64: the same formula, computed in double precision
    inv64 = rope_frequencies(head_dim).double()

    def table(pos):
        ang = torch.outer(pos.double(), inv64)
        ang = torch.cat((ang, ang), -1)
        return ang.cos(), ang.sin()

    for delta in (0, 1, 16, 256):
        mq, nk = m[delta:], m[: max_pos - delta]  # query at mq, key at nk = mq - delta
        s32 = (apply_rope(q.expand(len(mq), -1)[None, None], *rope(mq, max_pos))
               * apply_rope(k.expand(len(nk), -1)[None, None], *rope(nk, max_pos))).sum(-1).flatten()
        s64 = (apply_rope(q.double().expand(len(mq), -1)[None, None], *table(mq))
               * apply_rope(k.double().expand(len(nk), -1)[None, None], *table(nk))).sum(-1).flatten()
        emit(env, bench="rope_relative", head_dim=head_dim, max_pos=max_pos, delta=delta,
             pairs=len(mq), score=round(s64[0].item(), 6),
             spread_float32=(s32.max() - s32.min()).item(), spread_float64=(s64.max() - s64.min()).item())


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Meta's layout: channels (2i, 2i+1) form the complex number x_2i + j x_2i+1, times e^{j m theta_i}."""
    hd = x.shape[-1]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], hd // 2, 2))
    rot = torch.polar(torch.ones(len(pos), hd // 2), torch.outer(pos.float(), rope_frequencies(hd)))
    return torch.view_as_real(xc * rot).flatten(-2)


def rope_layouts(env: dict, n_embd: int = 256, n_head: int = 4, T: int = 128) -> None:
    """Attention scores of interleaved RoPE on Meta-layout weights vs rotate-half RoPE on permuted ones."""
    hd = n_embd // n_head
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n_embd, generator=g)
    wq, wk = torch.randn(2, n_embd, n_embd, generator=g) / n_embd**0.5  # Meta-layout checkpoints
    pos = torch.arange(T)

    def scores(q, k):  # (nh, T, hd) -> (nh, T, T)
        return q @ k.transpose(-2, -1)

    heads = lambda y: y.view(T, n_head, hd).transpose(0, 1)
    meta = scores(rope_interleaved(heads(x @ wq.T), pos), rope_interleaved(heads(x @ wk.T), pos))
    # the converter's permutation of the projection rows: per head, even channels first, then odd
    wq_hf, wk_hf = meta_to_rotate_half(wq, n_head), meta_to_rotate_half(wk, n_head)
    rope = RotaryEmbedding(hd, T)
    cos, sin = rope(pos, T)
    hf = scores(apply_rope(heads(x @ wq_hf.T)[None], cos, sin)[0],
                apply_rope(heads(x @ wk_hf.T)[None], cos, sin)[0])
    unpermuted = scores(apply_rope(heads(x @ wq.T)[None], cos, sin)[0],
                        apply_rope(heads(x @ wk.T)[None], cos, sin)[0])
    emit(env, bench="rope_layouts", n_embd=n_embd, n_head=n_head, T=T,
         max_abs_diff_permuted=(meta - hf).abs().max().item(),
         max_abs_diff_unpermuted=(meta - unpermuted).abs().max().item(),
         score_abs_max=meta.abs().max().item())


def best_of(fns: dict, repeats: int) -> dict:
    """Fastest of ``repeats`` timed calls (s) of each ``fns`` entry, the entries taking turns.

    Taking turns and keeping the minimum keeps the comparison fair on a machine shared with
    other jobs: a busy moment slows one call, not one variant.
    """
    best = {}
    for name, fn in fns.items():
        fn()  # warm-up
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@torch.inference_mode()
def rope_throughput(env: dict, repeats: int) -> None:
    """Whole forward passes, plus the rotation alone (``apply_rope`` on q and k in every layer)."""
    cases = [("small", SMALL, 4, 512), ("gpt2", dict(lmzoo.models.PRESETS["gpt2"][1]), 1, 256)]
    for name, base, B, T in cases:
        torch.manual_seed(0)
        models = {p: lmzoo.build("gpt2", **{**base, "pos_emb": p}).eval() for p in ("learned", "rope")}
        cfg = models["rope"].config
        idx = torch.randint(0, cfg.vocab_size, (B, T))
        q = torch.randn(B, cfg.n_head, T, cfg.head_dim)
        cos_sin = models["rope"].rope(torch.arange(T), T)
        fns = {p: partial(m, idx) for p, m in models.items()}
        fns["rotation"] = lambda q=q, cs=cos_sin: (apply_rope(q, *cs), apply_rope(q, *cs))  # q, k of a layer
        best = best_of(fns, repeats)
        for p, m in models.items():
            extra = {"rotation_ms": round(best["rotation"] * cfg.n_layer * 1e3, 2)} if p == "rope" else {}
            emit(env, bench="rope_throughput", model=name, pos_emb=p, batch=B, T=T, params=m.num_params(),
                 ms=round(best[p] * 1e3, 1), tok_s=round(B * T / best[p], 1), **extra)


def gqa_cache_bytes(env: dict) -> None:
    for preset in ("gpt2", "gpt2-improved"):
        with torch.device("meta"):
            model = lmzoo.build(preset)
        cfg = model.config
        for dtype in (torch.float32, torch.bfloat16):
            cache = model.init_cache(1, cfg.block_size, dtype=dtype)
            emit(env, bench="gqa_cache_bytes", preset=preset, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim, dtype=str(dtype).removeprefix("torch."),
                 bytes_per_token=cache.nbytes // cfg.block_size,
                 mib_at_block_size=round(cache.nbytes / 2**20, 2))


@torch.inference_mode()
def gqa_decode(env: dict, batch: int, prompt_len: int, new: int, repeats: int) -> None:
    """Prefill ``prompt_len`` tokens per row once, then time ``new`` greedy steps (best of ``repeats``)."""
    n_head = SMALL["n_head"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, SMALL["vocab_size"], (batch, prompt_len), generator=g)
    fns, info = {}, {}
    for n_kv in (n_head, n_head // 4, 1):
        torch.manual_seed(0)
        model = lmzoo.build("gpt2", **SMALL, n_kv_head=n_kv).eval()
        cache = model.init_cache(batch, prompt_len + new)
        t0 = time.perf_counter()
        first = model(prompt, cache=cache, last_only=True).logits[:, -1].argmax(-1)
        info[n_kv] = dict(params=model.num_params(), cache_mib=round(cache.nbytes / 2**20, 2),
                          prefill_s=round(time.perf_counter() - t0, 3))

        def decode(model=model, cache=cache, first=first):
            cache.pos = prompt_len  # rewind to just after the prompt: the prefilled slots stay valid
            nxt = first
            for _ in range(new):
                nxt = model(nxt[:, None], cache=cache).logits[:, -1].argmax(-1)

        fns[n_kv] = decode
    best = best_of(fns, repeats)
    for n_kv, s in best.items():
        emit(env, bench="gqa_decode", n_head=n_head, n_kv_head=n_kv, batch=batch, prompt=prompt_len,
             new_tokens=new, **info[n_kv], decode_ms_per_step=round(s / new * 1e3, 2),
             decode_tok_s=round(batch * new / s, 1))


@torch.inference_mode()
def gqa_kernel(env: dict, batch: int, context: int, repeats: int) -> None:
    """One decode step's attention in one layer (1 query per row over ``context`` cached keys):
    lmzoo's path (``repeat_kv`` then SDPA) vs SDPA reading the shared heads itself (``enable_gqa``)."""
    n_head, hd = SMALL["n_head"], SMALL["n_embd"] // SMALL["n_head"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n_head, 1, hd, generator=g)
    for n_kv in (n_head, n_head // 4, 1):
        buf = torch.randn(2, batch, n_kv, context + 64, hd, generator=g)  # a cache with free slots
        k, v = buf[0, :, :, :context], buf[1, :, :, :context]  # the filled part, as KVCache.update returns
        rep = n_head // n_kv
        fns = {
            "repeat_kv": lambda k=k, v=v, rep=rep: attend(q, repeat_kv(k, rep), repeat_kv(v, rep)),
            "enable_gqa": lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        diff = (fns["repeat_kv"]() - fns["enable_gqa"]()).abs().max().item()
        best = best_of({name: partial(loop, fn, 50) for name, fn in fns.items()}, repeats)
        emit(env, bench="gqa_kernel", n_head=n_head, n_kv_head=n_kv, batch=batch, context=context,
             **{f"us_{name}": round(s / 50 * 1e6, 1) for name, s in best.items()}, max_abs_diff=diff)


def loop(fn, n: int) -> None:
    for _ in range(n):
        fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["rope_relative", "rope_layouts", "rope_throughput", "gqa_cache_bytes", "gqa_kernel",
             "gqa_decode"]
    ap.add_argument("--only", nargs="+", choices=parts, default=parts)
    ap.add_argument("--max-pos", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "device": f"cpu ({os.cpu_count()} cores)",
           "threads": torch.get_num_threads()}
    if "rope_relative" in args.only:
        for max_pos in args.max_pos:
            rope_relative(env, 64, max_pos)
    if "rope_layouts" in args.only:
        rope_layouts(env)
    if "rope_throughput" in args.only:
        rope_throughput(env, args.repeats)
    if "gqa_cache_bytes" in args.only:
        gqa_cache_bytes(env)
    if "gqa_kernel" in args.only:
        gqa_kernel(env, batch=4, context=544, repeats=args.repeats)
    if "gqa_decode" in args.only:
        gqa_decode(env, batch=4, prompt_len=512, new=32, repeats=args.repeats)


if __name__ == "__main__":
    main()
