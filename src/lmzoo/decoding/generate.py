"""Autoregressive generation with a preallocated KV cache.

One prefill pass over the (left-padded) prompts fills the cache, then each step feeds only the
newest token. Sampling: greedy (``temperature=0``), temperature, top-k (keep the k most likely
tokens) and top-p / nucleus (keep the smallest set whose probability mass reaches p; Holtzman
et al. 2020). A seeded ``torch.Generator`` makes sampling reproducible.

Settings are checked by one function, :func:`check_sampling`, which the CLI, ``lmzoo serve`` and
the other decoders share; :func:`stream` checks them (and that the decoding cache fits in memory)
when it is called, before the first token, so a bad request fails before anything is printed or sent.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Sequence

import torch

from lmzoo.common import fmt_bytes
from lmzoo.errors import CheckpointError, ConfigError, DataError, LmzooError, ResourceError
from lmzoo.memguard import ENV as NO_MEMORY_CHECK
from lmzoo.memguard import available_bytes

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64 (a negative seed would alias seed + 2**64)
_TINY = torch.finfo(torch.float32).tiny  # smaller temperatures divide by zero in float32: they sample like this one


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_sampling(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> None:
    """Raise a one-line :class:`ConfigError` naming the first invalid setting.

    ``max_new_tokens`` an integer >= 0; ``temperature`` finite and >= 0 (0 = greedy); ``top_k`` a
    positive integer; ``top_p`` in (0, 1]; ``seed`` an integer in [0, 2**64) (what a torch generator takes).
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k <= 0):
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")


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


def nan_guard(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with NaN made 0, (B,) flag of rows that had a NaN), with no host synchronization: the
    decoding loops sample from the cleaned logits and raise :func:`nan_error` once the flag reaches the
    host with the tokens (a model with broken weights, not torch.multinomial's traceback)."""
    nan = torch.isnan(logits)
    return logits.masked_fill(nan, 0.0), nan.any(-1)


def nan_error() -> CheckpointError:
    return CheckpointError("the model produced NaN logits: its weights are not finite (a broken checkpoint?)")


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits (..., V) -> float32 logits of the distribution sampling draws from (dropped tokens -inf).

    Temperature > 0; speculative decoding (lmzoo.decoding) uses it to get the exact probabilities.
    The largest logit is subtracted first (softmax does not change): the most likely token's logit is
    then 0 however small the temperature, so 1e-30 gives 0 and -inf (greedy), never inf - inf = NaN.
    """
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(float(temperature), _TINY)
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


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts of different lengths: (ids (B, T_max), pad counts (B,))."""
    _check_prompts(prompts)
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids, pad


def cache_nbytes(model, batch: int, max_len: int) -> float | None:
    """Bytes ``model.init_cache(batch, max_len)`` would allocate, counted on the meta device.

    ``inf`` when the sizes cannot even be represented; None when it cannot be told (an ``init_cache``
    that cannot build on the meta device, or a cache without ``nbytes``).
    """
    def probe(n: int):
        return model.init_cache(batch, n, device="meta").nbytes

    try:
        probe(min(max_len, 2))  # the cache can be measured at all
    except Exception:
        return None
    try:
        return int(probe(max_len))
    except (RuntimeError, TypeError, ValueError, OverflowError):  # sizes past int64 (the small probe worked)
        return math.inf


def check_cache_fits(model, batch: int, max_len: int) -> None:
    """Raise a one-line :class:`ResourceError` when the decoding cache cannot fit in the device's memory.

    Caches that grow with the length (full attention) are refused before anything is allocated;
    bounded ones (a sliding-window ring buffer, a recurrent state) pass whatever ``max_len`` is.
    ``LMZOO_NO_MEMORY_CHECK=1`` skips the check (as for models, lmzoo.memguard).
    """
    if os.environ.get(NO_MEMORY_CHECK, "").strip() not in ("", "0"):
        return
    need = cache_nbytes(model, batch, max_len)
    if need is None:
        return
    device = torch.device(model.device)
    avail = available_bytes(device)
    if need == math.inf or (avail is not None and need > avail):
        size = "more than 2**63 bytes" if need == math.inf else fmt_bytes(need)
        room = f"{device.type} has {fmt_bytes(avail)} available" if avail is not None else "that cannot be allocated"
        raise ResourceError(
            f"the decoding cache for {batch} row(s) of up to {max_len:,} tokens needs {size} but {room}; "
            f"ask for fewer new tokens (max_new_tokens) or a shorter prompt, or set {NO_MEMORY_CHECK}=1 to try anyway"
        )


def _new_cache(model, batch: int, max_len: int, pad: torch.Tensor):
    try:
        return model.init_cache(batch, max_len, pad=pad)
    except RuntimeError as e:  # torch.OutOfMemoryError (CUDA), or the CPU allocator's refusal
        if isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e):
            raise ResourceError(
                f"out of memory allocating the decoding cache for {batch} row(s) of up to {max_len:,} tokens; "
                "ask for fewer new tokens or a shorter prompt"
            ) from None
        raise


def stream(
    model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (), seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """An iterator of the next token of every row, (B,) on the CPU, step by step.

    Rows that produced a stop token keep yielding that stop token (the caller stops reading
    them); the iteration ends when every row has stopped or ``max_new_tokens`` were produced.
    The settings, the prompts and the cache's memory are checked here, when ``stream`` is called.

    A model with a bounded position table (learned positions) decodes past its context by sliding
    its window: each row's context is its newest ``min(len, context)`` tokens; when a row's window is
    full, that row alone is recomputed from its newest half-context (nanoGPT crops the context at
    every step instead; this amortizes the recomputation). Each row slides on its own schedule, so a
    row's tokens do not depend on the other prompts of the batch.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    _check_prompts(prompts)
    limit = model.max_positions()
    longest = max(len(p) for p in prompts)
    cache_len = longest + max_new_tokens if limit is None else min(longest + max_new_tokens, limit)
    if max_new_tokens > 0:
        check_cache_fits(model, len(prompts), cache_len)
    # each row's context: what its next prefill reads (at most cache_len tokens: the newest ones)
    rows = [[int(t) for t in p[-cache_len:]] for p in prompts]
    sampling = (temperature, top_k, top_p)
    return _decode(model, rows, max_new_tokens, cache_len, limit is not None, sampling, list(stop_tokens), seed)


@torch.inference_mode()
def _decode(model, ctx: list[list[int]], max_new_tokens: int, cache_len: int, slide: bool, sampling: tuple,
            stop_tokens: list[int], seed: int | None) -> Iterator[torch.Tensor]:
    """The prefill/decode loop of :func:`stream` (arguments checked)."""
    if max_new_tokens == 0:
        return
    device = model.device
    B = len(ctx)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    keep = max(1, cache_len // 2)  # a row whose window is full restarts from its newest half-context

    def prefill():
        ids, pad = left_pad(ctx)
        cache = _new_cache(model, B, cache_len, pad.to(device))
        return cache, model(ids.to(device), cache=cache, last_only=True).logits[:, -1]

    with model.evaluating():
        cache, logits = prefill()
        stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits, nan = nan_guard(logits)
            nxt = sample_next(logits, *sampling, generator=gen)
            if stop.numel():
                nxt = torch.where(done, stop[0], nxt)  # finished rows repeat their stop token
                done |= torch.isin(nxt, stop)
            out, nan = torch.stack((nxt, nan.long())).cpu()  # one copy to the host per token
            if nan.any():
                raise nan_error()
            yield out
            if step + 1 == max_new_tokens or (stop.numel() and bool(done.all())):
                break
            if slide:
                for row, t in zip(ctx, out.tolist()):
                    row.append(t)
            if slide and cache.pos >= cache_len:  # the longest row's window is full: slide
                # full rows restart from their newest half; finished rows (they only repeat their stop
                # token) keep one token so that they do not make the others slide
                new = [row[-1:] if fin else row[-keep:] if len(row) > cache_len else row
                       for row, fin in zip(ctx, done.tolist())]
                moved = _slide_rows(model, cache, ctx, new)
                ctx[:] = new
                if not moved:
                    cache, logits = prefill()
                    continue
            logits = model(nxt[:, None], cache=cache).logits[:, -1]


def _slide_rows(model, cache, old: list[list[int]], new: list[list[int]]) -> bool:
    """Re-lay ``cache`` (holding every row of ``old`` but its newest token) for the rows of ``new``,
    recomputing only the rows whose context changed; False when the cache cannot re-lay its rows
    (``can_realign``: the caller then re-prefills the whole batch)."""
    redo = [b for b, (o, n) in enumerate(zip(old, new)) if n is not o and len(n) > 1]
    if not cache.can_realign or len({len(new[b]) for b in redo}) > 1:
        return False
    cache.realign([len(row) - 1 for row in new])  # the others keep their keys, moved left
    if redo:  # the slid rows' new context (all the same length), but its newest token: the next step's input
        part = model.init_cache(len(redo), len(new[redo[0]]) - 1)
        model(torch.tensor([new[b][:-1] for b in redo], device=model.device), cache=part, last_only=True)
        cache.write_rows(redo, part)
    return True


def generate(
    model, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (), seed: int | None = None,
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


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt text (an empty text: the end-of-text token, or id 0), after the tokenizer's
    BOS token when the model expects one (``tokenizer.add_bos``) and the text does not begin with it.

    A text with characters the tokenizer does not know raises a one-line error naming all of them
    (instead of generating from something else).
    """
    try:
        ids = tokenizer.encode(text)
    except LmzooError:
        unknown = []
        for c in dict.fromkeys(text):  # the distinct characters, in order
            try:
                tokenizer.encode(c)
            except LmzooError:
                unknown.append(c)
        if not unknown:  # another problem (e.g. invalid UTF-8 bytes): the tokenizer's own message
            raise
        shown = ", ".join(repr(c) for c in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
        raise DataError(
            f"the prompt has {len(unknown)} character(s) the tokenizer does not know: {shown} "
            f"(its vocabulary has {tokenizer.vocab_size} tokens)"
        ) from None
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
