"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax attention weighs value j for query i by exp(q_i . k_j); replace that similarity by a
kernel phi(q_i) . phi(k_j) with a positive feature map phi (elu(x) + 1 in the paper) and the
causal output becomes

    y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j)
        = phi(q_i) S_i / phi(q_i) z_i,      S_i = sum_{j<=i} phi(k_j) v_j^T  (d x d_v),
                                             z_i = sum_{j<=i} phi(k_j)        (d)

Matrix products are associative, so the sums can be carried along: S_i = S_{i-1} + phi(k_i) v_i^T,
z_i = z_{i-1} + phi(k_i). That is an RNN whose state (S, z) has a fixed size: decoding costs
O(d * d_v) per token and constant memory, however long the sequence (no KV cache).

Two ways to compute the same function:

- recurrent (:func:`linear_attention_step`): one token at a time, the decoding path;
- chunked parallel (:func:`causal_linear_attention`): split the sequence into chunks of C tokens.
  Within a chunk, the causal sum is a masked C x C product (quadratic in C only); everything
  before the chunk enters through the carried state (S, z). Memory is O(T * C + d * d_v) per
  head, linear in T, and the work is matmuls (fast) instead of a length-T Python loop.

Grouped-query heads (``n_kv_head`` < ``n_head``) share a state per key/value head: the state
is a function of keys and values only, so it shrinks with ``n_kv_head`` like a KV cache does.
Sums run in float32 whatever the input dtype (the state accumulates over the whole sequence).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmzoo.cache import DecodingState
from lmzoo.layers.attention import FusedQKV

EPS = 1e-6


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """The paper's feature map: elu(x) + 1 > 0 (positive, so the normalizer never vanishes)."""
    return F.elu(x) + 1


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": elu_plus_one,
    "relu": F.relu,  # sparse features (e.g. Qin et al. 2022); the normalizer relies on EPS
    "softplus": F.softplus,
}


def feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feature map by name; register a new one in :data:`FEATURE_MAPS` to make it a config choice."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; known: {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def _empty_state(k: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, nkv, _, d = k.shape
    return k.new_zeros(B, nkv, d, dv, dtype=torch.float32), k.new_zeros(B, nkv, d, dtype=torch.float32)


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Chunked parallel form. Features already applied: q (B, nh, T, d), k (B, nkv, T, d), v (B, nkv, T, dv).

    ``state`` = (S (B, nkv, d, dv), z (B, nkv, d)) summarizes the tokens before these (None: none).
    Returns y (B, nh, T, dv) in v's dtype and the state after the T tokens (float32).
    """
    B, nh, T, d = q.shape
    nkv, dv = k.shape[1], v.shape[-1]
    S, z = state if state is not None else _empty_state(k, dv)
    qg = q.float().view(B, nkv, nh // nkv, T, d)  # query heads grouped by the K/V head they share
    kf, vf = k.float(), v.float()
    out = []
    for t0 in range(0, T, chunk):
        qc, kc, vc = qg[:, :, :, t0 : t0 + chunk], kf[:, :, t0 : t0 + chunk], vf[:, :, t0 : t0 + chunk]
        C = kc.shape[2]
        # what came before the chunk, through the state
        num = torch.einsum("bgrtd,bgde->bgrte", qc, S)  # (B, nkv, rep, C, dv)
        den = torch.einsum("bgrtd,bgd->bgrt", qc, z)
        # inside the chunk: the causal C x C kernel matrix
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scores = torch.einsum("bgrtd,bgsd->bgrts", qc, kc).masked_fill(~causal, 0.0)
        num = num + torch.einsum("bgrts,bgse->bgrte", scores, vc)
        den = den + scores.sum(-1)
        out.append(num / (den[..., None] + EPS))
        S = S + torch.einsum("bgsd,bgse->bgde", kc, vc)
        z = z + kc.sum(2)
    y = torch.cat(out, dim=3).reshape(B, nh, T, dv)
    return y.to(v.dtype), (S, z)


def linear_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Recurrent form, one token: q (B, nh, 1, d), k (B, nkv, 1, d), v (B, nkv, 1, dv) -> y (B, nh, 1, dv).

    S <- S + phi(k) v^T;  z <- z + phi(k);  y = phi(q) S / phi(q) z. The state is all there is to carry.
    """
    B, nh, _, d = q.shape
    nkv, dv = k.shape[1], v.shape[-1]
    S, z = state if state is not None else _empty_state(k, dv)
    kt, vt = k[:, :, 0].float(), v[:, :, 0].float()  # (B, nkv, d), (B, nkv, dv)
    S = S + kt[..., :, None] * vt[..., None, :]
    z = z + kt
    qt = q[:, :, 0].float().view(B, nkv, nh // nkv, d)
    num = torch.einsum("bgrd,bgde->bgre", qt, S)
    den = torch.einsum("bgrd,bgd->bgr", qt, z)
    y = (num / (den[..., None] + EPS)).reshape(B, nh, 1, dv)
    return y.to(v.dtype), (S, z)


class LinearAttentionState(DecodingState):
    """The decoding cache of linear attention: (S, z) per layer, a fixed size whatever the length.

    ``S`` is (n_layer, B, n_kv_head, head_dim, head_dim) and ``z`` (n_layer, B, n_kv_head, head_dim),
    float32. The attention layers read and write their state with ``get(layer)`` / ``set(layer, S, z)``;
    ``mask(T)`` returns which of the T new tokens are real (left padding is kept out of the state).
    A recurrence: it cannot roll back.
    """

    buffers = zeroed = ("S", "z")

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        super().__init__(batch, device, pad)  # dtype: accepted for the protocol; the state is always float32
        self.S = torch.zeros(n_layer, batch, n_kv_head, head_dim, head_dim, device=device)
        self.z = torch.zeros(n_layer, batch, n_kv_head, head_dim, device=device)

    def mask(self, T: int, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(real (B, T) bool or None when no row is padded, True): which new tokens enter the state."""
        return self.real_tokens(T), True

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.S[layer], self.z[layer]

    def set(self, layer: int, S: torch.Tensor, z: torch.Tensor) -> None:
        self.S[layer].copy_(S.detach())  # a cache is never differentiated
        self.z[layer].copy_(z.detach())


class LinearSelfAttention(FusedQKV):
    """Causal linear attention with the parameter layout of :class:`~lmzoo.layers.attention.CausalSelfAttention`
    (fused ``qkv``, ``proj``: :class:`~lmzoo.layers.attention.FusedQKV`), so the two are interchangeable in
    a block.

    Training and prefill use the chunked parallel form; a single new token uses the recurrent step.
    Positions must come from outside the attention (a learned table, or none at all): RoPE on
    phi(q), phi(k) would break the positivity the normalizer relies on.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, bias: bool = True, dropout: float = 0.0,
                 feature: str = "elu", chunk: int = 64, head_dim: int | None = None):
        super().__init__(n_embd, n_head, n_kv_head, bias, dropout, head_dim=head_dim)
        self.phi = feature_map(feature)
        self.chunk = chunk

    def forward(
        self,
        x: torch.Tensor,
        rope=None,
        mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: LinearAttentionState | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). ``mask`` (B, T) bool: the real tokens (from ``cache.mask``)."""
        q, k, v = self.split_heads(x)
        q, k = self.phi(q), self.phi(k)  # (B, nh, T, hd), (B, nkv, T, hd)
        if mask is not None:
            k = k * mask[:, None, :, None].to(k.dtype)  # padding adds nothing to S or z
        state = cache.get(layer) if cache is not None else None
        if x.shape[1] == 1:
            y, state = linear_attention_step(q, k, v, state)
        else:
            y, state = causal_linear_attention(q, k, v, state, self.chunk)
        if cache is not None:
            cache.set(layer, *state)
        return self.merge_heads(y)
