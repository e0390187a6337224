"""What the parallel decoders share: a cache that can roll back, and counting accepted tokens.

Every decoder here guesses several tokens, runs the model over all of them in one forward pass
(the cache grows by the whole guess), then keeps only a verified prefix. Rolling back is
``cache.rollback(pos)``: keys and values past it are masked out (``KVCache.mask`` uses ``pos``) and
overwritten by the next forward. A ring buffer (``RollingKVCache``) cannot roll back, since writing
the guess overwrote the oldest keys, nor can a recurrent state: the decoders ask ``init_cache`` for
one that can (``rollback=True``) and check its ``can_rollback``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmzoo.cache import DecodingState
from lmzoo.decoding.generate import left_pad
from lmzoo.errors import ConfigError


def rollback_cache(model, batch: int, max_len: int, pad: torch.Tensor | None = None) -> DecodingState:
    """A decoding state for ``model`` that can roll back (a full-length KV cache, never a ring)."""
    cache = model.init_cache(batch, max_len, pad=pad, rollback=True)
    if not cache.can_rollback:
        raise ConfigError(f"the {model.family} model's decoding state ({type(cache).__name__}) cannot roll back")
    return cache


def check_length(model, needed: int) -> None:
    """Refuse a generation that would run past a learned position table (no sliding re-prefill here)."""
    limit = model.max_positions()
    if limit is not None and needed > limit:
        raise ConfigError(
            f"prompt + new tokens + guesses = {needed} positions exceed the model's {limit}; "
            "generate fewer tokens or use ordinary decoding (lmzoo.decoding.generate), which slides its context"
        )


def prepare_decoding(prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *models
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prologue of every parallel decoder: left-padded (ids (B, P), pad (B,)) on the first model's
    device, and the cache length ``P + max_new_tokens`` (guesses never run past the last new token),
    checked against every model's position table."""
    ids, pad = prepare_prompts(prompts, models[0].device)
    max_len = ids.shape[1] + max_new_tokens
    for model in models:
        check_length(model, max_len)
    return ids, pad, max_len


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
    prefill, producing ``tokens`` tokens per row; ``accepted`` guesses kept in each step, of ``proposed``
    guesses verified in all (an acceptance rate is ``sum(accepted) / proposed``)."""

    steps: int = 0
    tokens: int = 0
    accepted: list[int] = field(default_factory=list)
    proposed: int = 0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per forward pass of the (target) model; ordinary decoding makes 1."""
        return self.tokens / max(self.steps, 1)

    @property
    def mean_accepted(self) -> float:
        """Mean number of guessed tokens accepted per verification step."""
        return sum(self.accepted) / max(len(self.accepted), 1)
