"""What the parallel decoders share: a cache that can roll back, and counting accepted tokens.

Every decoder here guesses several tokens, runs the model over all of them in one forward pass
(the cache grows by the whole guess), then keeps only a verified prefix. Rolling back is just
setting ``cache.pos``: keys and values past it are masked out (``KVCache.mask`` uses ``pos``) and
overwritten by the next forward. A ring buffer (``RollingKVCache``) cannot roll back, since writing
the guess overwrote the oldest keys, so the decoders ask for a full-length cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmzoo.cache import KVCache
from lmzoo.decoding.generate import left_pad
from lmzoo.errors import ConfigError


def rollback_cache(model, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
    """A full-length :class:`KVCache` for ``model`` (never a ring buffer: it must roll back)."""
    kw = {"rolling": False} if "rolling" in inspect.signature(model.init_cache).parameters else {}
    cache = model.init_cache(batch, max_len, pad=pad, **kw)
    if not isinstance(cache, KVCache):
        raise ConfigError(f"{type(model).__name__} has no full KV cache to roll back (got {type(cache).__name__})")
    return cache


def check_length(model, needed: int) -> None:
    """Refuse a generation that would run past a learned position table (no sliding re-prefill here)."""
    limit = model.max_positions() if hasattr(model, "max_positions") else None
    if limit is not None and needed > limit:
        raise ConfigError(
            f"prompt + new tokens + guesses = {needed} positions exceed the model's {limit}; "
            "generate fewer tokens or use ordinary decoding (lmzoo.decoding.generate), which slides its context"
        )


def leading_true(ok: torch.Tensor) -> torch.Tensor:
    """ok (B, k) bool -> (B,) long: how many entries of each row are True before the first False."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def prepare_prompts(prompts: Sequence[Sequence[int]] | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids (B, T), pad (B,)) on ``device``."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    ids, pad = left_pad(prompts)
    return ids.to(device), pad.to(device)


@dataclass
class DecodeStats:
    """What a parallel decoder did: ``steps`` model forward passes (verification steps) after the
    prefill, producing ``tokens`` tokens per row; ``accepted`` guesses kept in each step."""

    steps: int = 0
    tokens: int = 0
    accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per forward pass of the (target) model; ordinary decoding makes 1."""
        return self.tokens / max(self.steps, 1)

    @property
    def mean_accepted(self) -> float:
        """Mean number of guessed tokens accepted per verification step."""
        return sum(self.accepted) / max(len(self.accepted), 1)
