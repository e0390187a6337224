"""Fast decoding: a static KV cache and a decode step compiled into a CUDA graph.

At batch 1 a decode step reads every weight once to produce one token, so its floor is
``weight bytes / memory bandwidth`` (GPT-2 124M in bf16: 0.25 GB / 3 TB/s = 83 us on an H100).
Eager PyTorch is far from it: each of the hundreds of kernels of a step is launched from Python
(a few microseconds each), and a growing cache changes shapes every token. Three changes close
the gap (docs/performance.md):

- :class:`~lmzoo.cache.StaticKVCache`: fixed shapes, fixed addresses, the write position on the
  device; every step is the same computation on the same tensors;
- the step (model forward + logits of the last position) compiled with
  ``torch.compile(mode="reduce-overhead")``: inductor fuses the small kernels and CUDA graphs
  replay the whole step with one launch;
- no host synchronization per token: the next token is chosen on the device and fed back; the
  tokens come to the host once at the end (stop tokens freeze a finished row on the device).

Prefill is one batched forward over the (left-padded) prompts, eager (it is compute-bound).
On a CPU the step runs eagerly by default; the results equal :func:`lmzoo.decoding.generate.generate`
(greedy: token for token; tests/test_static_cache.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from lmzoo.cache import StaticKVCache
from lmzoo.decoding.generate import check_sampling, left_pad, nan_error, nan_guard, sample_next
from lmzoo.errors import ConfigError


def static_cache(model, batch: int, max_len: int, dtype=None, device=None, pad=None) -> StaticKVCache | None:
    """A :class:`StaticKVCache` for ``model``, or None when its decoding state has no static twin
    (sliding windows, recurrent state) or the model cannot decode from one (``static_decoding``:
    ALiBi's length-dependent biases)."""
    if not model.static_decoding:
        return None
    return model.init_cache(batch, max_len, dtype=dtype, device=device, pad=pad).static()


# One static cache per model, reused (reset) by the next call with the same shapes: its buffers keep
# their addresses, so a captured CUDA graph replays instead of being recorded again.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reused_cache(model, batch: int, max_len: int, device, pad: torch.Tensor) -> StaticKVCache | None:
    key = (batch, max_len, model.dtype, torch.device(device), tuple(pad.tolist()))
    held = _CACHES.get(model)  # (key, cache)
    if held is not None and held[0] == key:
        held[1].reset()
        return held[1]
    cache = static_cache(model, batch, max_len, device=device, pad=pad)
    if cache is not None:
        _CACHES[model] = (key, cache)
    return cache


def _decode_step(model, tok: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """tok (B, 1) -> float32 logits (B, vocab) of the next token; writes one slot of the cache."""
    return model(tok, cache=cache).logits[:, -1].float()


_COMPILED: dict[tuple, object] = {}


def compiled_step(mode: str | None = "reduce-overhead", backend: str = "inductor"):
    """The decode step compiled once per (backend, mode): one graph, no graph breaks (fullgraph), static
    shapes (``dynamic=False``: a second model or length compiles its own graph, never a symbolic one)."""
    key = (backend, mode)
    if key not in _COMPILED:
        kw = {"mode": mode} if mode and backend == "inductor" else {}
        _COMPILED[key] = torch.compile(_decode_step, backend=backend, fullgraph=True, dynamic=False, **kw)
    return _COMPILED[key]


@torch.no_grad()  # not inference_mode: the cache's tensors are reused by later calls and CUDA graphs
def generate_static(
    model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (), seed: int | None = None,
    compile: bool | None = None,
    step_fn=None,
) -> list[list[int]]:
    """Like :func:`lmzoo.decoding.generate.generate` (default greedy), with a static cache and a compiled step.

    ``compile`` None compiles on CUDA (CUDA graphs) and runs eagerly elsewhere; ``step_fn`` replaces
    the step (tests pass one compiled with another backend). Raises ConfigError when the model's
    decoding state cannot be static (use :func:`lmzoo.decoding.generate.generate`) or the prompt plus
    ``max_new_tokens`` exceed a learned position table.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    ids, pad = left_pad(prompts)
    B, T = ids.shape
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    limit = model.max_positions()
    if limit is not None and T + max_new_tokens > limit:
        raise ConfigError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceed the model's {limit} positions; "
            "the static cache does not slide (use lmzoo.decoding.generate.generate)"
        )
    device = model.device
    cache = _reused_cache(model, B, T + max_new_tokens, device, pad)
    if cache is None:
        raise ConfigError(f"{type(model).__name__} with this config keeps no plain KV cache: no static decoding")
    if step_fn is None:
        step_fn = compiled_step() if (compile if compile is not None else device.type == "cuda") else _decode_step
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    with model.evaluating():
        logits = model(ids.to(device), cache=cache, last_only=True).logits[:, -1].float()  # batched prefill
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        nan_seen = torch.zeros(B, dtype=torch.bool, device=device)  # checked once, after the loop
        for step in range(max_new_tokens):
            logits, nan = nan_guard(logits)
            nan_seen |= nan
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            if stop.numel():  # a finished row repeats its stop token; decided on the device
                nxt = torch.where(done, stop[0], nxt)
                done |= torch.isin(nxt, stop)
            out[:, step] = nxt
            if step + 1 < max_new_tokens:
                if mark_step is not None and step_fn is not _decode_step:
                    mark_step()  # a new replay: the previous step's outputs may be overwritten
                logits = step_fn(model, nxt[:, None], cache).clone()
    rows = out.tolist()  # the one host synchronization
    if nan_seen.any():
        raise nan_error()
    stops = set(stop_tokens)
    for r, row in enumerate(rows):
        for i, t in enumerate(row):
            if t in stops:
                rows[r] = row[: i + 1]
                break
    return rows
