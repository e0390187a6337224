"""Autoregressive generation with a preallocated KV cache.

One prefill pass over the (left-padded) prompts fills the cache, then each step feeds only the
newest token. Sampling: greedy (``temperature=0``), temperature, top-k (keep the k most likely
tokens) and top-p / nucleus (keep the smallest set whose probability mass reaches p; Holtzman
et al. 2020). A seeded ``torch.Generator`` makes sampling reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .errors import ConfigError


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits (..., V) -> float32 logits of the distribution sampling draws from (dropped tokens -inf).

    Temperature > 0; speculative decoding (lmzoo.decoding) uses it to get the exact probabilities.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ConfigError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts of different lengths: (ids (B, T_max), pad counts (B,))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids, pad


@torch.inference_mode()
def stream(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) on the CPU, step by step.

    Rows that produced a stop token keep yielding that stop token (the caller stops reading
    them); the loop ends when every row has stopped or ``max_new_tokens`` were produced.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    ids, pad = left_pad(prompts)
    device = model.device
    B, T = ids.shape
    if max_new_tokens == 0:
        return
    # A model with a bounded position table (learned positions) decodes past its context by
    # re-prefilling the cache with the newest half-context of tokens when it fills up (nanoGPT
    # crops the context at every step instead; this amortizes the recomputation).
    limit = model.max_positions() if hasattr(model, "max_positions") else None
    cache_len = T + max_new_tokens if limit is None else min(T + max_new_tokens, limit)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    seq = ids.to(device)
    pad = pad.to(device)

    def prefill(keep: int):
        ctx = seq[:, -keep:]
        row_pad = (pad - (seq.shape[1] - keep)).clamp_min(0)
        cache = model.init_cache(B, cache_len, pad=row_pad)
        return cache, model(ctx, cache=cache, last_only=True).logits[:, -1]

    was_training = model.training
    model.eval()
    try:
        cache, logits = prefill(T if T < cache_len else max(1, cache_len // 2))
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            if stop.numel():
                nxt = torch.where(done, stop[0], nxt)  # finished rows repeat their stop token
                done |= torch.isin(nxt, stop)
            yield nxt.cpu()
            if step + 1 == max_new_tokens or (stop.numel() and bool(done.all())):
                break
            if cache.pos >= cache_len:  # only with a bounded context: slide the window
                seq = torch.cat([seq, *[t[:, None] for t in new_tokens], nxt[:, None]], dim=1)
                new_tokens = []
                cache, logits = prefill(max(1, cache_len // 2))
            else:
                if limit is not None:
                    new_tokens.append(nxt)
                logits = model(nxt[:, None], cache=cache).logits[:, -1]
    finally:
        model.train(was_training)


def generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; returns the new tokens of each row.

    A row ends after its first stop token (included). ``temperature=0`` is greedy decoding.
    """
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    stops = set(stop_tokens)
    for toks in stream(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stop_tokens, seed=seed,
    ):
        for b, t in enumerate(toks.tolist()):
            if not finished[b]:
                out[b].append(t)
                finished[b] = t in stops
    return out
