"""What every lmzoo model has in common: the output type and a few helpers.

The contract (see docs/ARCHITECTURE.md): ``forward(idx, targets=None, cache=None)`` returns an
:class:`LMOutput`; ``init_cache(batch, max_len)`` gives decoding state; ``num_params()`` and
``flops_per_token(seq_len)`` for MFU; ``config`` is the family's Config and ``family`` its name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.config import Config


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab), or (B, 1, vocab) with last_only=True
    loss: torch.Tensor | None = None  # the training objective: cross-entropy (+ weighted auxiliary terms)
    aux: dict[str, torch.Tensor] | None = None  # auxiliary terms reported separately (e.g. MoE balance)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; targets of -1 are ignored (padding, prompts)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class LanguageModel(nn.Module):
    """Base class of the model families (helpers only; each family writes its own forward)."""

    family: str = ""
    config: Config

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights are counted once. ``non_embedding`` drops position tables.
        Weights a quantized layer keeps packed in buffers (modules with ``packed_params()``: NF4,
        packed BitNet) count as the parameters they stand for."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and name.endswith("wpe.weight"):
                continue
            n += p.numel()
        return n + sum(m.packed_params() for m in self.modules() if hasattr(m, "packed_params"))

    def active_params(self) -> int:
        """Parameters one token computes with: ``num_params(non_embedding=True)`` minus, in mixture-of-
        experts layers (modules with ``inactive_params()``), the experts a token skips. For FLOPs."""
        skipped = sum(
            m.inactive_params() for m in self.modules() if m is not self and hasattr(m, "inactive_params")
        )
        return self.num_params(non_embedding=True) - skipped

    def weight_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the weights take (in ``dtype`` if given, else as stored)."""
        if dtype is not None:
            return self.num_params() * torch.empty((), dtype=dtype).element_size()
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        return n

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
