"""Infini-attention (Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind").

The input is cut into segments of ``segment`` tokens. Inside a segment a layer attends as
usual (causal softmax, RoPE). Across segments it reads a *compressive memory*: the linear-
attention state of every earlier segment of this layer (see layers/linear_attention.py), with
sigma = elu + 1 on the keys and queries before RoPE. For segment s with keys K, values V:

    retrieve:  A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})
    mix:       A     = g * A_mem + (1 - g) * A_dot,      g = sigmoid(beta), one learned beta per head
    update:    M_s   = M_{s-1} + sigma(K)^T V                                        (linear)
           or  M_s   = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))   (delta rule)
               z_s   = z_{s-1} + sum_t sigma(K_t)

The delta rule writes only what the memory does not already return for those keys, so
repeating a key-value pair does not keep adding it. Memory per layer is (d_key x d_value) +
d_key per key/value head, plus the keys/values of the unfinished segment: bounded, however
long the input.

In the first segment the memory is empty (the paper's retrieval is 0/0 there); we take
A = A_dot, so on inputs of one segment the layer is exactly softmax attention. Gradients flow
through the memory across the segments of one forward call (backpropagation through the
segments, as in the paper); a decoding cache is never differentiated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.cache import DecodingState
from lmzoo.layers.attention import FusedQKV, attend, repeat_kv
from lmzoo.layers.rope import apply_rope

EPS = 1e-6


def sigma(x: torch.Tensor) -> torch.Tensor:
    """The memory's feature map, elu + 1 (positive), computed in float32."""
    return F.elu(x.float()) + 1


def retrieve(sq: torch.Tensor, M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sq = sigma(Q) (B, nh, T, d), M (B, nkv, d, dv), z (B, nkv, d) -> A_mem (B, nh, T, dv) float32."""
    B, nh, T, d = sq.shape
    nkv = M.shape[1]
    qg = sq.view(B, nkv, nh // nkv, T, d)  # query heads grouped by the memory they read
    num = torch.einsum("bgrtd,bgde->bgrte", qg, M)
    den = torch.einsum("bgrtd,bgd->bgrt", qg, z)
    return (num / (den[..., None] + EPS)).reshape(B, nh, T, -1)


def update_memory(
    M: torch.Tensor, z: torch.Tensor, sk: torch.Tensor, v: torch.Tensor, delta_rule: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one segment in: sk = sigma(K) (B, nkv, n, d), v (B, nkv, n, dv) float32 -> new (M, z)."""
    if delta_rule:
        old = torch.einsum("bgtd,bgde->bgte", sk, M) / (torch.einsum("bgtd,bgd->bgt", sk, z)[..., None] + EPS)
        v = v - old  # write only what the memory does not already give back for these keys
    return M + torch.einsum("bgtd,bgte->bgde", sk, v), z + sk.sum(2)


class InfiniCache(DecodingState):
    """Decoding state of Infini-attention: per layer the memory (M, z) and the unfinished segment.

    ``M`` (n_layer, B, n_kv_head, hd, hd) and ``z`` (n_layer, B, n_kv_head, hd) in float32; the
    current segment's keys after RoPE (for softmax), sigma(keys before RoPE) (for the memory update)
    and values, each (n_layer, B, n_kv_head, segment, hd). Allocated once: constant memory.
    Segments are counted from the first slot, so every row must start at the same place: left-
    padded batches are refused (a padded row would see its segment boundaries shifted). It cannot
    roll back (a completed segment is folded into the memory).
    """

    buffers = ("M", "z", "k", "sk", "v")
    zeroed = ("M", "z")  # the segment buffers are read only up to pos % segment

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, segment: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        if pad is not None and bool(torch.as_tensor(pad).any()):
            raise ValueError(
                "Infini-attention counts segments from the first slot: left-padded batches would shift "
                "each row's segments; generate rows of different lengths separately"
            )
        super().__init__(batch, device)
        self.segment = segment
        self.M = torch.zeros(n_layer, batch, n_kv_head, head_dim, head_dim, device=device)
        self.z = torch.zeros(n_layer, batch, n_kv_head, head_dim, device=device)
        seg_shape = (n_layer, batch, n_kv_head, segment, head_dim)
        self.k = torch.zeros(seg_shape, dtype=dtype, device=device)
        self.sk = torch.zeros(seg_shape, device=device)
        self.v = torch.zeros(seg_shape, dtype=dtype, device=device)

    def mask(self, T: int, window: int | None = None) -> tuple[None, bool]:
        return None, True  # the layer builds its own segment-local masks

    def get(self, layer: int):
        """(M, z, k, sk, v) of ``layer``; the segment buffers cut to the tokens of the unfinished segment."""
        f = self.pos % self.segment
        return self.M[layer], self.z[layer], self.k[layer, :, :, :f], self.sk[layer, :, :, :f], self.v[layer, :, :, :f]

    def set(self, layer: int, M, z, k, sk, v) -> None:
        self.M[layer].copy_(M.detach())  # a cache is never differentiated
        self.z[layer].copy_(z.detach())
        n = k.shape[2]
        self.k[layer, :, :, :n] = k.detach()
        self.sk[layer, :, :, :n] = sk.detach()
        self.v[layer, :, :, :n] = v.detach()


class InfiniAttention(FusedQKV):
    """Causal self-attention within segments plus a compressive memory across them.

    Parameters ``qkv`` and ``proj`` have the layout of :class:`~lmzoo.layers.attention.CausalSelfAttention`
    (:class:`~lmzoo.layers.attention.FusedQKV`: a pretrained attention's weights carry over unchanged);
    ``gate`` (n_head,) is beta.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, bias: bool = True, dropout: float = 0.0,
                 backend: str = "sdpa", head_dim: int | None = None, segment: int = 64, delta_rule: bool = False,
                 gate_init: float = 0.0):
        super().__init__(n_embd, n_head, n_kv_head, bias, dropout, backend, head_dim)
        self.gate = nn.Parameter(torch.full((n_head,), float(gate_init)))
        self.segment, self.delta_rule = segment, delta_rule

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask=None,
        is_causal: bool = True,
        cache: InfiniCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): the T tokens that follow the ``cache``'s (or the first T)."""
        B, T, _ = x.shape
        hd, nh, nkv, seg = self.head_dim, self.n_head, self.n_kv_head, self.segment
        q, k, v = self.split_heads(x)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        sq, sk = sigma(q), sigma(k)  # the memory path uses positions-free queries and keys
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            M, z, kb, skb, vb = cache.get(layer)  # kb/skb/vb: the unfinished segment so far
            start = cache.pos
        else:
            M = x.new_zeros(B, nkv, hd, hd, dtype=torch.float32)
            z = x.new_zeros(B, nkv, hd, dtype=torch.float32)
            kb, skb, vb = k[:, :, :0], sk[:, :, :0], v[:, :, :0]
            start = 0
        g = torch.sigmoid(self.gate.float())[None, :, None, None]  # (1, nh, 1, 1)
        dropout_p = self.dropout if self.training else 0.0
        out, i = [], 0
        while i < T:
            f = kb.shape[2]  # tokens of the current segment already seen
            n = min(seg - f, T - i)  # the new tokens that belong to it
            kl, vl = torch.cat([kb, k[:, :, i : i + n]], 2), torch.cat([vb, v[:, :, i : i + n]], 2)
            # causal softmax inside the segment; the n queries are the last n of the f + n keys
            if f == 0 or n == 1:
                local_mask, causal = None, n > 1
            else:
                local_mask = torch.ones(n, f + n, dtype=torch.bool, device=x.device).tril(diagonal=f)
                causal = False
            a = attend(
                q[:, :, i : i + n], repeat_kv(kl, nh // nkv), repeat_kv(vl, nh // nkv),
                local_mask, causal, dropout_p, self.backend,
            )  # (B, nh, n, hd)
            if (start + i) >= seg:  # a memory of earlier segments exists: mix it in
                a = (g * retrieve(sq[:, :, i : i + n], M, z) + (1 - g) * a.float()).to(a.dtype)
            out.append(a)
            skl = torch.cat([skb, sk[:, :, i : i + n]], 2)
            if f + n == seg:  # the segment is complete: compress it into the memory, start afresh
                M, z = update_memory(M, z, skl, vl.float(), self.delta_rule)
                kb, skb, vb = kl[:, :, :0], skl[:, :, :0], vl[:, :, :0]
            else:
                kb, skb, vb = kl, skl, vl
            i += n
        if cache is not None:
            cache.set(layer, M, z, kb, skb, vb)
        return self.merge_heads(torch.cat(out, dim=2))
