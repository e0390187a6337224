"""Compute-optimal model and data sizes (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", the Chinchilla paper).

Training compute is C ~= 6 N D FLOPs for N parameters and D tokens (2 N per token forward,
4 N backward). For a fixed C, the loss is lowest at a particular split between N and D:

- **the 20x rule** (the paper's approaches 1 and 2 find N_opt and D_opt both ~ C^0.5, and their
  Table 3 gives about 20 tokens per parameter at every scale): D_opt = 20 N, so
  N_opt = sqrt(C / 120), D_opt = 20 N_opt.
- **approach 3**: fit L(N, D) = E + A / N^alpha + B / D^beta (E=1.69, A=406.4, B=410.7,
  alpha=0.34, beta=0.28) and minimize it under C = 6 N D:
  N_opt = G (C/6)^a, D_opt = (C/6)^b / G with G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta / (alpha + beta) = 0.45, b = alpha / (alpha + beta) = 0.55.
  At large budgets it prefers somewhat smaller models than the 20x rule.

N counts all parameters, embeddings included (as Hoffmann et al. do; Kaplan et al. 2020 left
them out, one reason their exponents differ: Pearce & Song 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmzoo.errors import ConfigError

TOKENS_PER_PARAM = 20.0
# Approach 3's fitted parametric loss (Hoffmann et al. 2022, eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


@dataclass
class Plan:
    """A compute-optimal (params, tokens) pair and what training it costs."""

    method: str  # "20x" or "approach3"
    params: float
    tokens: float
    flops: float  # 6 N D
    loss: float  # approach 3's predicted loss L(N, D) (nats/token on MassiveText; indicative only)

    def train_seconds(self, tokens_per_s: float) -> float:
        return self.tokens / tokens_per_s


def predicted_loss(params: float, tokens: float) -> float:
    """Approach 3's L(N, D) = E + A/N^alpha + B/D^beta."""
    return E + A / params**ALPHA + B / tokens**BETA


def for_params(params: float, method: str = "20x") -> Plan:
    """The compute-optimal token count for a model of ``params`` parameters."""
    if params <= 0:
        raise ConfigError(f"parameter count must be positive, got {params}")
    if method == "20x":
        tokens = TOKENS_PER_PARAM * params
    elif method == "approach3":
        # invert N_opt(C) = G (C/6)^a for C, then D = C / (6 N)
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        a = BETA / (ALPHA + BETA)
        c6 = (params / g) ** (1 / a)
        tokens = c6 / params
    else:
        raise ConfigError(f"unknown method {method!r}; choose 20x or approach3")
    return Plan(method, params, tokens, 6 * params * tokens, predicted_loss(params, tokens))


def for_flops(flops: float, method: str = "20x") -> Plan:
    """The compute-optimal (N, D) for a budget of ``flops`` training FLOPs."""
    if not flops > 0 or not math.isfinite(flops):
        raise ConfigError(f"FLOP budget must be a positive number, got {flops}")
    if method == "20x":
        params = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
        tokens = TOKENS_PER_PARAM * params
    elif method == "approach3":
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        a, b = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
        params, tokens = g * (flops / 6) ** a, (flops / 6) ** b / g
    else:
        raise ConfigError(f"unknown method {method!r}; choose 20x or approach3")
    return Plan(method, params, tokens, flops, predicted_loss(params, tokens))


def human(n: float) -> str:
    """1.2e9 -> '1.20B' (K, M, B, T)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """Seconds as '3.2 h', '4.1 days', '2.3 years'."""
    for unit, scale in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds:.0f} s"
