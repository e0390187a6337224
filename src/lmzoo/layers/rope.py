"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer").

Each pair of channels (i, i + d/2) of a query or key at position m is rotated by the angle
m * theta_i with theta_i = base^(-2i/d). The dot product of a rotated query at m and a rotated
key at n then depends only on m - n: relative position for free, no learned parameters.

We use the "rotate half" layout (pairs are channel i and i + d/2), the layout of the Hugging
Face checkpoints; Meta's original code pairs adjacent channels (2i, 2i+1), which is the same
function after a fixed permutation of the q/k projection rows (the converters apply it).
"""

from __future__ import annotations

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
