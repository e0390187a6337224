"""Position-wise feed-forward layers.

- ``MLP``: GPT-2's two-layer perceptron, ``proj(act(fc(x)))`` with a 4x hidden width and GELU
  (GPT-2 uses the tanh approximation of GELU, ``gelu_tanh``).
- ``SwiGLU`` (Shazeer 2020, "GLU Variants Improve Transformer"): ``down(silu(gate(x)) * up(x))``.
  Three matrices instead of two, so the hidden width is usually 2/3 of 4x to keep the
  parameter count (Llama: 8/3 * d rounded up to a multiple of 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.layers.kan import KANFeedForward, kan_hidden  # noqa: F401 - kan_hidden: the default width of mlp="kan"


class MLP(nn.Module):
    """``proj(act(fc(x)))``; ``activation`` gelu, gelu_tanh or relu (the original Transformer's, and
    Transformer-XL's). ``hidden_dropout``: dropout on the hidden units too (Transformer-XL)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, activation: str = "gelu", dropout: float = 0.0,
                 hidden_dropout: bool = False):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.activation = activation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.hidden_dropout = nn.Dropout(dropout) if hidden_dropout and dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.proj(self.hidden_dropout(h)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """Llama's rule: 2/3 of 4*dim, rounded up to a multiple, so SwiGLU has about the MLP's parameters."""
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def make_mlp(kind: str, dim: int, hidden: int, bias: bool, dropout: float) -> nn.Module:
    """Build the feed-forward layer a config names: ``gelu``, ``gelu_tanh``, ``swiglu`` or ``kan``."""
    if kind in ("gelu", "gelu_tanh"):
        return MLP(dim, hidden, bias=bias, activation=kind, dropout=dropout)
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias=bias, dropout=dropout)
    if kind == "kan":  # Kolmogorov-Arnold feed-forward (layers/kan.py); no biases: the splines shift
        return KANFeedForward(dim, hidden, dropout=dropout)
    raise ValueError(f"unknown mlp {kind!r}")
