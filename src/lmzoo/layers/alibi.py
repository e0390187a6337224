"""ALiBi: attention with linear biases (Press, Smith & Lewis 2022, "Train Short, Test Long").

No position embedding at all: each head h adds a penalty proportional to the distance between
query i and key j to the attention score,

    score[h, i, j] = q_i . k_j / sqrt(d)  -  m_h * (i - j)          (j <= i)

with a fixed, head-specific slope m_h. Heads with a large slope look only at recent tokens,
heads with a small slope look far back. Because the bias depends on i - j only and grows
linearly without end, a model trained on short sequences meets nothing new on long ones: it
extrapolates (the paper trains at 1024 and evaluates at 2048+ without loss of perplexity).

Slopes (the paper's section 3 and its reference code): for n heads, n a power of two, the
geometric sequence starting at 2^(-8/n) with ratio 2^(-8/n):

    n = 8:  1/2, 1/4, ..., 1/256            n = 16: 1/sqrt(2), 1/2, ..., 1/256

For other n, the slopes of the closest power of two below n, then every other slope of
2 * that power (interleaving the sequence of the next power of two) until n are reached.

With SDPA the bias becomes an additive float mask (``attn_mask`` accepts a float tensor that
is added to the scores); ``-inf`` where the causal or padding mask forbids a key.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The paper's head slopes m_h, shape (n_head,), float32."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # 2^(-8/n)
        return [start * start**i for i in range(n)]

    if n_head <= 0:
        raise ValueError(f"n_head must be positive, got {n_head}")
    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_two(n_head), dtype=torch.float32)
    closest = 2 ** math.floor(math.log2(n_head))
    extra = alibi_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.cat([torch.tensor(power_of_two(closest), dtype=torch.float32), extra])


def alibi_bias(
    slopes: torch.Tensor,
    T: int,
    S: int,
    mask: torch.Tensor | None = None,
    is_causal: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask (B or 1, n_head, T, S) for T queries over S keys, the queries last.

    Query i sits at slot S - T + i and key j at slot j (the KV cache's layout), so the distance is
    ``S - T + i - j``; left padding shifts both equally and does not change it. ``mask`` / ``is_causal``
    are what :meth:`lmzoo.cache.KVCache.mask` returns (bool, True = may attend); forbidden keys get
    ``-inf``. The bias is built in float32, then cast to ``dtype`` (the attention's dtype).
    """
    device = slopes.device
    q = torch.arange(S - T, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    dist = (q - k).float()  # (T, S); negative for future keys, which the mask removes
    bias = -slopes.float()[:, None, None] * dist  # (nh, T, S)
    bias = bias[None]  # (1, nh, T, S)
    if is_causal:
        bias = bias.masked_fill(k > q, float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))  # mask: (B or 1, 1, T, S)
    return bias.to(dtype)
