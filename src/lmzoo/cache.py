"""Decoding state kept outside the model: a preallocated key/value cache.

Autoregressive decoding recomputes nothing it has seen: after a prefill pass over the prompt,
each new token's keys and values are appended to a buffer and the new query attends to the
whole buffer. Memory is ``2 * n_layer * B * n_kv_head * max_len * head_dim`` elements, allocated
once (no reallocation or copy per token).

Batches of prompts of different lengths are *left-padded*: row b has ``pad[b]`` padding slots
in front. Padding keys are masked out, and positions are counted from each row's first real
token, so every row computes exactly what it would compute alone.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values for every layer: ``k[layer]`` and ``v[layer]`` are (B, n_kv_head, max_len, head_dim).

    Protocol used by the models: for each forward chunk of T tokens, ``positions(T)`` and
    ``mask(T)`` once, ``update(layer, k, v)`` in every attention layer, then ``advance(T)``.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # slots written so far (the same for every row: rows are left-padded)
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=device)
            if pad.shape != (batch,):
                raise ValueError(f"pad must have shape ({batch},), got {tuple(pad.shape)}")
            if not bool(pad.any()):
                pad = None
        self.pad = pad

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        self.pos = 0

    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the next T tokens: (T,), or (B, T) counted from each row's first real token."""
        pos = torch.arange(self.pos, self.pos + T, device=self.k.device)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp_min(0)

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T new queries over the ``pos + T`` keys in the buffer.

        ``mask`` is bool (B or 1, 1, T, S), True = may attend; ``None`` with ``is_causal`` when the
        plain causal mask is exact (no padding and nothing cached yet, or a single new token).
        """
        S = self.pos + T
        if self.pad is None:
            if self.pos == 0:
                return None, True
            if T == 1:
                return None, False
        q = torch.arange(self.pos, S, device=self.k.device)[:, None]  # absolute slot of each query
        kk = torch.arange(S, device=self.k.device)[None, :]
        m = kk <= q  # (T, S) causal
        if self.pad is not None:
            # a real query never sees padding; a padding query sees itself so softmax stays finite
            real_key = kk[None] >= self.pad[:, None, None]  # (B, 1, S)
            m = m[None] & (real_key | (kk == q)[None])  # (B, T, S)
            return m[:, None], False
        return m[None, None], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values at ``pos`` and return the filled part (B, n_kv, pos + T, hd)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T
