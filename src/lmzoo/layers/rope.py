"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer").

Each pair of channels (i, i + d/2) of a query or key at position m is rotated by the angle
m * theta_i with theta_i = base^(-2i/d). The dot product of a rotated query at m and a rotated
key at n then depends only on m - n: relative position for free, no learned parameters.

We use the "rotate half" layout (pairs are channel i and i + d/2), the layout of the Hugging
Face checkpoints; Meta's original code pairs adjacent channels (2i, 2i+1), which is the same
function after a fixed permutation of the q/k projection rows (the converters apply it).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies theta_i = base^(-2i/d), shape (head_dim // 2,), float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; ``forward(pos, end)`` returns (cos, sin) of shape (*pos.shape, head_dim)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta), persistent=False)
        self._build(max_seq_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (n, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd): the same angle for channel i and i + hd/2
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, pos: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``pos``; ``end`` (a Python int > every position) grows the table when needed."""
        if end > self.cos.shape[0]:
            self._build(end)  # longer than planned (e.g. evaluation at a longer context)
        return self.cos[pos], self.sin[pos]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, nh, T, hd) by the angles in cos/sin (T, hd) or (B, T, hd)."""
    if cos.dim() == 3:  # per-row positions (left-padded batches): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


# --- Context extension: scaled RoPE ---------------------------------------------------------------
#
# A model trained at context L sees, at longer contexts, rotation angles it never saw. Three
# ways of changing the frequencies so that a longer context looks familiar:
#
# - ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``,
#   i.e. position m is treated as m / factor. Simple; blurs nearby positions.
# - ``ntk`` (static "NTK-aware" scaling, bloc97 2023): the base becomes theta * factor^(d/(d-2)),
#   so the lowest frequency is interpolated by ``factor`` while the highest ones barely change.
#   (transformers' "dynamic" type recomputes this base from the current length at run time; the
#   static form keeps cached and uncached decoding identical, so lmzoo implements that one.)
# - ``yarn`` (Peng et al. 2023): per frequency, interpolate (divide by ``factor``) the ones whose
#   wavelength is long compared with the original context, keep (extrapolate) the short ones, and
#   blend linearly in between ("NTK-by-parts", boundaries beta_fast/beta_slow rotations); cos and
#   sin are multiplied by 0.1 ln(factor) + 1 to restore the attention's sharpness. The same
#   formulas as transformers' ``rope_type="yarn"``.

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")


def yarn_attention_factor(factor: float) -> float:
    """YaRN's ``mscale``: 0.1 ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def scaled_rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: str = "none",
    factor: float = 1.0,
    original_max: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) after ``scaling`` (one of :data:`ROPE_SCALINGS`)."""
    if scaling == "none":
        return rope_frequencies(head_dim, theta)
    if scaling == "linear":
        return rope_frequencies(head_dim, theta) / factor
    if scaling == "ntk":
        return rope_frequencies(head_dim, theta * factor ** (head_dim / (head_dim - 2)))
    if scaling == "yarn":

        def correction_dim(rotations: float) -> float:
            # the channel pair index whose wavelength fits ``rotations`` times in the original context
            return head_dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (short wavelengths), 0: interpolate it
        base = rope_frequencies(head_dim, theta)
        return base / factor * (1 - extrapolate) + base * extrapolate
    raise ValueError(f"unknown rope scaling {scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}")


class ScaledRotaryEmbedding(RotaryEmbedding):
    """:class:`RotaryEmbedding` with context-extension scaling; ``scaling="none"`` is plain RoPE.

    ``attention_factor`` multiplies cos and sin (so q.k by its square); None = YaRN's default for
    ``yarn`` and 1 otherwise.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_max: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
    ):
        super().__init__(head_dim, max_seq_len, theta)
        self.scaling, self.factor, self.original_max = scaling, factor, original_max
        self.beta_fast, self.beta_slow = beta_fast, beta_slow
        if attention_factor is None:
            attention_factor = yarn_attention_factor(factor) if scaling == "yarn" else 1.0
        self.attention_factor = attention_factor
        self.reset_buffers(self.inv_freq.device, max_seq_len)

    def _frequencies(self) -> torch.Tensor:
        return scaled_rope_frequencies(
            self.head_dim, self.theta, self.scaling, self.factor, self.original_max,
            self.beta_fast, self.beta_slow,
        )

    def _build(self, n: int) -> None:
        super()._build(n)
        scale = getattr(self, "attention_factor", 1.0)  # unset during the parent's __init__
        if scale != 1.0:
            self.cos, self.sin = self.cos * scale, self.sin * scale

    def reset_buffers(self, device: torch.device | str, n: int | None = None) -> None:
        """Recompute inv_freq and the cos/sin tables on ``device`` (after a meta-device build)."""
        n = n or self.cos.shape[0]
        self.inv_freq = self._frequencies().to(device)
        self._build(n)
