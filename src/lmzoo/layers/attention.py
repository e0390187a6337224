"""Causal self-attention: multi-head, grouped-query and multi-query, with two backends.

Scaled dot-product attention (Vaswani et al. 2017) for queries Q (T, d), keys K and values V (S, d):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V,   M[i, j] = 0 if j may be seen from i else -inf

Grouped-query attention (GQA, Ainslie et al. 2023) gives ``n_head`` query heads but only
``n_kv_head`` key/value heads; each K/V head is shared by ``n_head // n_kv_head`` query heads.
``n_kv_head == n_head`` is ordinary multi-head attention, ``n_kv_head == 1`` is multi-query
attention (Shazeer 2019). The KV cache shrinks by the same factor.

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which dispatches to
  FlashAttention / memory-efficient / cuDNN kernels on GPU (never materializes the T x S matrix);
- ``reference``: the formula above written out, used by tests to check the fast path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.layers.rope import apply_rope


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, hd) -> (B, n_kv * n_rep, S, hd): each K/V head serves ``n_rep`` query heads."""
    if n_rep == 1:
        return x
    B, nkv, S, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hd).reshape(B, nkv * n_rep, S, hd)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The textbook formula. q (B, nh, T, hd), k/v (B, nh, S, hd), mask (.., T, S): bool (True = attend)
    or float (added to the scores, as SDPA's ``attn_mask``; e.g. ALiBi's biases)."""
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    if is_causal:
        # query i sits at absolute position S - T + i; it may see keys 0..S - T + i
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        att = att.masked_fill(~causal, float("-inf"))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


# SDPA shares K/V heads among query heads itself since torch 2.5 (no copy of K and V per step)
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def attend(q, k, v, mask=None, is_causal=False, dropout_p=0.0, backend="sdpa") -> torch.Tensor:
    """Dispatch to a backend. q (B, nh, T, hd); k/v (B, n_kv, S, hd) with n_kv dividing nh (GQA)."""
    n_rep = q.shape[1] // k.shape[1]
    if backend == "reference" or (n_rep > 1 and not _SDPA_GQA):
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if backend == "reference":
        return reference_attention(q, k, v, mask, is_causal, dropout_p)
    gqa = {"enable_gqa": True} if n_rep > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **gqa)


class FusedQKV(nn.Module):
    """The parameter layout of every attention here: one fused ``qkv`` projection and the output
    ``proj``, so the kinds (softmax, Infini, linear, cross-layer) are interchangeable in a block and
    a pretrained attention's weights carry over to another kind.

    ``qkv`` packs the query heads, then the key heads, then the value heads along the output
    dimension: ``n_head * hd + 2 * n_kv_head * hd`` rows (queries only with ``kv=False``).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, bias: bool = True, dropout: float = 0.0,
                 backend: str = "sdpa", head_dim: int | None = None, kv: bool = True):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = head_dim or n_embd // n_head
        self.qkv = nn.Linear(n_embd, (n_head + (2 * n_kv_head if kv else 0)) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.backend = backend

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd)."""
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        return (q.view(B, T, nh, hd).transpose(1, 2), k.view(B, T, nkv, hd).transpose(1, 2),
                v.view(B, T, nkv, hd).transpose(1, 2))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, nh, T, hd) -> the output projection (B, T, C)."""
        B, _, T, _ = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))


class CausalSelfAttention(FusedQKV):
    """Fused QKV projection -> (RoPE) -> attention over [cache; new] keys -> output projection."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = True, cache=None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): the T tokens after the cache's (or the first T)."""
        q, k, v = self.split_heads(x)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd): everything seen so far
        dropout_p = self.dropout if self.training else 0.0
        return self.merge_heads(attend(q, k, v, mask, is_causal, dropout_p, self.backend))


# --- Sliding-window attention (Longformer, Beltagy et al. 2020; Mistral 7B, Jiang et al. 2023) -----
#
# A query at position i sees only the keys i - window < j <= i. One layer then costs O(T * window)
# instead of O(T^2), and a ring buffer of ``window`` keys per layer is all decoding needs
# (lmzoo.cache.RollingKVCache). Information still travels further than the window: after L
# layers a token can depend on tokens up to about L * window back, as in a CNN's receptive field.
# Models mix local and global layers with a pattern (e.g. "LLLLLG", one global layer in six).


def layer_windows(n_layer: int, sliding_window: int | None, pattern: str = "") -> list[int | None]:
    """Each layer's window: ``pattern`` of 'L' (local: ``sliding_window``) and 'G' (global: None),
    repeated over the layers; an empty pattern makes every layer local (Mistral)."""
    if sliding_window is None:
        return [None] * n_layer
    pattern = pattern or "L"
    return [sliding_window if pattern[i % len(pattern)] == "L" else None for i in range(n_layer)]


def window_mask(
    T: int, window: int | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for a whole sequence of T tokens (no cache), as :meth:`KVCache.mask` returns.

    The plain causal flag when the window does not bite (no window, or window >= T); else a bool
    (1, 1, T, T) mask, True = may attend: key j is visible from query i iff i - window < j <= i.
    """
    if window is None or window >= T:
        return None, True
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return ((j <= i) & (i - j < window))[None, None], False
