"""Cross-layer attention, CLA (Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with
Cross-Layer Attention").

Grouped-query attention shares keys/values between the heads of one layer; CLA shares them
between adjacent layers. With a sharing factor s, layers are grouped in runs of s: the first
layer of a group projects keys and values as usual, the other s - 1 layers project only
queries and attend over the first layer's keys/values. The KV cache keeps one entry per group,
so it shrinks by s (CLA2: half), and the K/V projections of the other layers disappear.

The group's keys/values travel explicitly from block to block (``kv`` in, ``kv`` out), so the
computation stays visible in the model's forward and activation checkpointing can recompute a
block from its inputs.
"""

from __future__ import annotations

import torch

from lmzoo.layers.attention import FusedQKV, attend, repeat_kv
from lmzoo.layers.rope import apply_rope


def kv_groups(n_layer: int, share_every: int) -> int:
    """Number of K/V groups (cache entries) for ``n_layer`` layers shared ``share_every`` at a time."""
    return -(-n_layer // share_every)


class CrossLayerAttention(FusedQKV):
    """Causal self-attention that either makes its group's keys/values or reuses them.

    ``makes_kv=True``: the parameter layout of :class:`~lmzoo.layers.attention.CausalSelfAttention`
    (``qkv`` packs queries, keys, values). ``makes_kv=False``: ``qkv`` projects queries only.
    ``share_every`` maps a layer index to its cache entry, ``layer // share_every``.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, makes_kv: bool, share_every: int, bias: bool = True,
                 dropout: float = 0.0, backend: str = "sdpa", head_dim: int | None = None):
        super().__init__(n_embd, n_head, n_kv_head, bias, dropout, backend, head_dim, kv=makes_kv)
        self.makes_kv, self.share_every = makes_kv, share_every

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = True, cache=None, layer: int = 0,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, C) -> (B, T, C) and the group's (k, v), each (B, n_kv_head, S, hd) with S the keys
        attended to (cached + new). A layer that does not make K/V needs its group's ``kv``."""
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        if self.makes_kv:
            q, k, v = self.split_heads(x)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
            if rope is not None:
                k = apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.update(layer // self.share_every, k, v)  # one cache entry per group
            kv = (k, v)
        elif kv is None:
            raise ValueError(f"layer {layer} reuses the keys/values of its group's first layer: pass kv")
        else:
            q = self.qkv(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v = repeat_kv(kv[0], nh // nkv), repeat_kv(kv[1], nh // nkv)
        dropout_p = self.dropout if self.training else 0.0
        return self.merge_heads(attend(q, k, v, mask, is_causal, dropout_p, self.backend)), kv
