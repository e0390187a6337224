"""Decoders that emit several tokens per forward pass, each exactly matching ordinary decoding.

- :mod:`.speculative`: a draft model proposes, the target verifies (Leviathan et al. 2023; Chen et al. 2023);
  the rejection-sampling rule keeps the target's distribution exactly, greedy stays greedy.
- :mod:`.jacobi`: fixed-point iteration over a block of guesses (Santilli et al. 2023) and the CLLM
  consistency loss that makes it converge in fewer iterations (Kou et al. 2024).
- multi-token prediction heads draft for their own model: :func:`lmzoo.models.mtp.self_speculative_generate`.
"""

from __future__ import annotations

from lmzoo.decoding.common import DecodeStats
from lmzoo.decoding.jacobi import JacobiStats, consistency_loss, jacobi_generate
from lmzoo.decoding.speculative import check_draft, speculative_accept, speculative_generate

__all__ = [
    "DecodeStats", "JacobiStats", "check_draft", "consistency_loss", "jacobi_generate", "speculative_accept",
    "speculative_generate",
]
