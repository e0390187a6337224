"""Decoding state kept outside the model: one base for every kind, and the key/value caches.

Autoregressive decoding recomputes nothing it has seen: after a prefill pass over the prompt,
each new token's keys and values are appended to a buffer and the new query attends to the
whole buffer. Memory is ``2 * n_layer * B * n_kv_head * max_len * head_dim`` elements, allocated
once (no reallocation or copy per token).

Batches of prompts of different lengths are *left-padded*: row b has ``pad[b]`` padding slots
in front. Padding keys are masked out, and positions are counted from each row's first real
token, so every row computes exactly what it would compute alone.

Every kind of decoding state derives from :class:`DecodingState`, which owns what they share:
the padding (validated once), the position counter ``pos``, position ids, the padding-mask rule,
``advance``, ``reset``, ``rollback``, the byte size, and the *capabilities* a caller may rely on
(declared as class attributes, never detected from the class):

==================  =====================================================================
``can_rollback``    setting ``pos`` back forgets the newer tokens (parallel decoders guess,
                    then keep a verified prefix); a ring buffer or a recurrent state cannot
``can_realign``     rows can be re-laid in place (``realign`` / ``write_rows``): batched
                    decoding slides one row's window without recomputing the others
``is_static``       shapes and addresses never change; positions are bounded by the capacity
                    (a compiled decode step sees the same integers at every token)
==================  =====================================================================

The kinds: :class:`KVCache` (keys/values, full length), :class:`RollingKVCache` (a ring of
``window`` slots per sliding-window layer), :class:`StaticKVCache` (fixed shapes, CUDA graphs),
:class:`MambaCache` (the selective SSM's fixed-size state), :class:`HybridCache` (Jamba: a KV
cache and an SSM state); beside their layers, linear attention's state, Infini-attention's
compressive memory and Transformer-XL's memory.
"""

from __future__ import annotations

import torch


class DecodingState:
    """The base of every decoding state (see the module docstring).

    Protocol used by the models: per forward chunk of T tokens, ``positions(T)`` (and ``mask``
    where the kind has one) once, each layer's own read/write, then ``advance(T)``. A subclass
    lists its buffers in :meth:`tensors` (for ``nbytes``) and zeroes what must be zeroed in
    :meth:`reset`.
    """

    can_rollback = False
    can_realign = False
    is_static = False
    buffers: tuple[str, ...] = ()  # the attributes holding its tensors (a tensor or a list of them)
    zeroed: tuple[str, ...] = ()  # the ones that accumulate and so are zeroed by reset (a KV cache's are masked)

    def __init__(self, batch: int, device: torch.device | str = "cpu", pad: torch.Tensor | None = None):
        self.batch = batch
        self.device = torch.device(device)
        self.pos = 0  # slots written so far (the same for every row: rows are left-padded)
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=self.device)
            if pad.shape != (batch,):
                raise ValueError(f"pad must have shape ({batch},), got {tuple(pad.shape)}")
            if self.device.type != "meta" and not bool(pad.any()):
                pad = None
        self.pad = pad

    # -- positions and masks -------------------------------------------------------------------
    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the next T tokens: (T,), or (B, T) counted from each row's first real token."""
        pos = torch.arange(self.pos, self.pos + T, device=self.device)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp_min(0)

    def bound(self, T: int) -> int:
        """An upper bound of the positions of the next T tokens, as a Python int (no device sync)."""
        return self.pos + T

    def real_tokens(self, T: int) -> torch.Tensor | None:
        """(B, T) bool, True where the next T slots hold real tokens; None when no row is padded
        (recurrent states keep padding out of what they accumulate)."""
        if self.pad is None:
            return None
        slots = torch.arange(self.pos, self.pos + T, device=self.device)
        return slots[None, :] >= self.pad[:, None]

    def with_padding(self, allowed: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The padding-mask rule, for every kind: ``allowed`` (T, S) bool over query slots ``q`` (T, 1)
        and key slots ``k`` (1, S) -> (B or 1, 1, T, S). A real query never sees padding; a padding
        query sees itself, so that its softmax stays finite (its output is never used)."""
        if self.pad is None:
            return allowed[None, None]
        real_key = k[None] >= self.pad[:, None, None]  # (B, 1, S)
        return (allowed[None] & (real_key | (k == q)[None]))[:, None]

    # -- lifetime ------------------------------------------------------------------------------
    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        """Back to empty (same rows, same padding)."""
        self.pos = 0
        for name in self.zeroed:
            getattr(self, name).zero_()

    def rollback(self, pos: int) -> None:
        """Forget every token from ``pos`` on (parallel decoders keep a verified prefix)."""
        if not self.can_rollback:
            raise ValueError(f"a {type(self).__name__} cannot roll back")
        if not 0 <= pos <= self.pos:
            raise ValueError(f"rollback to {pos}: the state holds {self.pos} tokens")
        self.pos = pos

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer the state allocated."""
        out = []
        for name in self.buffers:
            value = getattr(self, name)
            out += value if isinstance(value, list) else [value]
        return out

    def static(self) -> StaticKVCache | None:
        """This (empty) state's twin with fixed shapes and addresses (:class:`StaticKVCache`), or None
        when the kind has none."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes allocated (constant for the fixed-size kinds: buffers are never reallocated)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache(DecodingState):
    """Keys/values for every layer: ``k[layer]`` and ``v[layer]`` are (B, n_kv_head, max_len, head_dim).

    Per forward chunk of T tokens: ``positions(T)`` and ``mask(T)`` once, ``update(layer, k, v)``
    in every attention layer, then ``advance(T)``.
    """

    can_rollback = True
    can_realign = True
    buffers = ("k", "v")

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        super().__init__(batch, device, pad)
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def mask(self, T: int, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T new queries over the ``pos + T`` keys in the buffer.

        ``mask`` is bool (B or 1, 1, T, S), True = may attend; ``None`` with ``is_causal`` when the
        plain causal mask is exact (no padding and nothing cached yet, or a single new token).
        ``window`` (sliding-window attention): a query sees only the ``window`` latest keys,
        itself included (key j visible from query i iff i - window < j <= i).
        """
        S = self.pos + T
        windowed = window is not None and window < S  # otherwise no query is far enough to notice
        if self.pad is None and not windowed:
            if self.pos == 0:
                return None, True
            if T == 1:
                return None, False
        q = torch.arange(self.pos, S, device=self.device)[:, None]  # absolute slot of each query
        k = torch.arange(S, device=self.device)[None, :]
        m = k <= q  # (T, S) causal
        if windowed:
            m = m & (q - k < window)
        return self.with_padding(m, q, k), False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values at ``pos`` and return the filled part (B, n_kv, pos + T, hd)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def realign(self, lengths: list[int]) -> None:
        """Keep each row's newest ``lengths[b]`` entries, right-aligned at the new ``pos = max(lengths)``
        (the left padding follows). Positions count from each row's first real token, so the moved
        keys stay valid: batched decoding slides one row's window without recomputing the others."""
        pad = self.pad.tolist() if self.pad is not None else [0] * self.batch
        if len(lengths) != len(pad) or any(not 0 <= n <= self.pos - p for n, p in zip(lengths, pad)):
            raise ValueError(f"realign: lengths {lengths} exceed the rows' cached entries")
        new_pos = max(lengths)
        if new_pos != self.pos:  # every row shifts by the same pos - new_pos slots (what falls before a
            for buf in (self.k, self.v):  # row's new padding is masked out)
                buf[:, :, :, :new_pos] = buf[:, :, :, self.pos - new_pos : self.pos].clone()
        self.pos = new_pos
        new_pad = torch.tensor([new_pos - n for n in lengths], dtype=torch.long, device=self.device)
        self.pad = new_pad if bool(new_pad.any()) else None

    def write_rows(self, rows: list[int], src: KVCache) -> None:
        """Put ``src``'s entries (its ``src.pos`` slots, unpadded) as the newest entries of ``rows``."""
        n = src.pos
        self.k[:, rows, :, self.pos - n : self.pos] = src.k[:, :, :, :n]
        self.v[:, rows, :, self.pos - n : self.pos] = src.v[:, :, :, :n]

    def static(self) -> StaticKVCache:
        return StaticKVCache(self)

    def one_layer(self, layer: int) -> KVCache:
        """An empty one-layer cache laid out like layer ``layer`` (same rows, padding and position)."""
        _, B, nkv, max_len, hd = self.k.shape
        c = KVCache(1, B, nkv, hd, max_len, dtype=self.k.dtype, device=self.device, pad=self.pad)
        c.pos = self.pos
        return c


class RollingKVCache(DecodingState):
    """A KV cache whose memory is bounded by the attention window: one ring buffer per layer.

    Layer ``l`` with window ``w`` keeps only its last ``min(w, max_len)`` keys/values in
    ``k[l]``/``v[l]`` of shape (B, n_kv_head, capacity, head_dim); the key of position p lives in
    slot ``p % capacity``. With sliding-window attention a query never looks further back than
    ``w`` tokens, so overwriting the oldest slot loses nothing: generation of any length uses
    constant memory and computes exactly what full attention with the same window computes.
    Layers without a window (global layers of a local/global pattern) get ``max_len`` slots and,
    like :class:`KVCache`, refuse to overflow. A ring cannot roll back (the guess overwrote keys).

    Same protocol as :class:`KVCache`; the layout of the keys ``update`` returns (and so of the
    mask ``mask(T, window)`` builds for them) depends on the chunk:

    - first chunk (``pos == 0``): just the T new keys;
    - one new token: the ring itself, after writing the token into it (the slot it overwrites
      held position ``pos - capacity``, already outside every window);
    - a chunk of T > 1 tokens later on: ``[ring before the write; T new keys]``, since the first
      new queries still need keys the chunk's last tokens will overwrite.
    """

    buffers = ("k", "v")  # lists: one ring per layer

    def __init__(self, windows: list[int | None], batch: int, n_kv_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        super().__init__(batch, device, pad)
        self.windows = list(windows)
        self.max_len = max_len
        self.capacity = [self._capacity(w) for w in self.windows]
        self.k, self.v = ([torch.zeros(batch, n_kv_head, c, head_dim, dtype=dtype, device=device)
                           for c in self.capacity] for _ in range(2))

    def _capacity(self, window: int | None) -> int:
        return min(window, self.max_len) if window is not None else self.max_len

    def _key_slots(self, T: int, capacity: int) -> torch.Tensor:
        """Absolute slot of each key ``update`` returns for a chunk of T (-1 = never written)."""
        new = torch.arange(self.pos, self.pos + T, device=self.device)
        if self.pos == 0:
            return new
        s = torch.arange(capacity, device=self.device)
        last = self.pos if T == 1 else self.pos - 1  # newest position in the ring at attention time
        ring = last - (last - s) % capacity  # the latest position p <= last with p % capacity == s
        return ring if T == 1 else torch.cat([ring, new])

    def mask(self, T: int, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T new queries of the layers with this ``window`` (see KVCache.mask)."""
        capacity = self._capacity(window)
        if self.pad is None:
            if self.pos == 0 and (window is None or window >= T):
                return None, True
            if T == 1 and self.pos >= capacity - 1:
                return None, False  # a full ring holds exactly the keys the new token may see
        k = self._key_slots(T, capacity)[None, :]  # (1, S)
        q = torch.arange(self.pos, self.pos + T, device=self.device)[:, None]  # (T, 1)
        m = (k >= 0) & (k <= q)
        if window is not None:
            m = m & (q - k < window)
        return self.with_padding(m, q, k), False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values (B, n_kv, T, hd); return the keys/values to attend over (layout above)."""
        T = k.shape[2]
        cap, window = self.capacity[layer], self.windows[layer]
        end = self.pos + T
        if end > cap and (window is None or cap < window):
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len} (layer {layer})")
        kb, vb = self.k[layer], self.v[layer]
        if self.pos > 0 and T > 1:
            out = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)  # before the ring is overwritten
        n = min(T, cap)  # only the last ``cap`` new keys survive in the ring
        slots = torch.arange(end - n, end, device=kb.device) % cap
        kb.index_copy_(2, slots, k[:, :, T - n :])
        vb.index_copy_(2, slots, v[:, :, T - n :])
        if self.pos == 0:
            return k, v
        return out if T > 1 else (kb, vb)


class StaticKVCache(DecodingState):
    """A KV cache whose tensors keep one shape and one address from the first token to the last.

    Same buffers as :class:`KVCache`, (n_layer, B, n_kv_head, max_len, head_dim), but the write
    position lives on the device (``start``, a 0-d int64 tensor) and every step attends over all
    ``max_len`` slots with a mask hiding the unwritten ones. A decode step then has the same
    shapes, the same tensors and no Python number that changes from token to token: compiled once
    and captured as a CUDA graph (``torch.compile(mode="reduce-overhead")``), it replays with no
    host synchronization (:mod:`lmzoo.decoding.static`). Writes are ``index_copy_`` at
    ``start + arange(T)``; the caller sizes ``max_len`` (an overflow is not checked: that would need
    a sync per token). ``pos`` reads ``start`` back to the host (a sync: for bookkeeping outside the
    compiled step, never inside it).
    """

    can_rollback = True
    is_static = True
    buffers = ("k", "v")

    def __init__(self, cache: KVCache):
        """The static twin of an empty :class:`KVCache`: its buffers and padding, the position on the device."""
        self.k, self.v, self.max_len = cache.k, cache.v, cache.max_len
        self.start = torch.zeros((), dtype=torch.long, device=self.k.device)  # slots written so far
        super().__init__(cache.batch, cache.device, cache.pad)
        if self.k.device.type == "cuda":  # CUDA graphs may then read and write them in place, uncopied
            for t in (self.k, self.v, self.start, self.pad):
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    @property
    def pos(self) -> int:
        return int(self.start)

    @pos.setter
    def pos(self, value: int) -> None:
        self.start.fill_(value)

    def bound(self, T: int) -> int:
        """The capacity: the same number at every step, so a compiled step does not recompile."""
        return self.max_len

    def positions(self, T: int) -> torch.Tensor:
        pos = self.start + torch.arange(T, device=self.device)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp_min(0)

    def mask(self, T: int, window: int | None = None) -> tuple[torch.Tensor, bool]:
        """Bool (B or 1, 1, T, max_len) over every slot: written, causal, in the window, not padding."""
        q = (self.start + torch.arange(T, device=self.device))[:, None]
        k = torch.arange(self.max_len, device=self.device)[None, :]
        m = k <= q  # (T, max_len): also hides the slots not written yet
        if window is not None:
            m = m & (q - k < window)
        return self.with_padding(m, q, k), False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values at ``start``; return the whole buffers (B, n_kv, max_len, hd)."""
        idx = self.start + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, idx, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        self.start += T

    def rollback(self, pos: int) -> None:
        self.start.fill_(pos)  # no check: reading pos back would sync


class MambaCache(DecodingState):
    """The recurrent state of selective-SSM layers: its size does not depend on the length decoded.

    ``conv[layer]`` (B, d_conv - 1, d_inner) holds the last inputs of the causal convolution and
    ``ssm[layer]`` (B, d_inner, d_state) the SSM state, kept in float32 because it accumulates over
    the whole sequence. A layer reads ``real_tokens(T)`` to zero its left padding, updates both
    tensors in place, and the model calls ``advance(T)`` once per chunk.
    """

    buffers = zeroed = ("conv", "ssm")

    def __init__(self, n_layer: int, batch: int, d_inner: int, d_conv: int, d_state: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None):
        super().__init__(batch, device, pad)
        self.conv = torch.zeros(n_layer, batch, d_conv - 1, d_inner, dtype=dtype, device=device)
        self.ssm = torch.zeros(n_layer, batch, d_inner, d_state, dtype=torch.float32, device=device)


class HybridCache(DecodingState):
    """One decoding state for a model that mixes attention and SSM layers (Jamba).

    ``kv`` holds the keys/values of the attention layers (numbered among themselves) and ``ssm``
    the states of the Mamba layers (numbered among themselves); both see the same padding and the
    same position. The model asks ``mask`` and ``positions`` once per chunk, passes ``kv`` to its
    attention layers and ``ssm`` to its Mamba layers, and ``advance(T)`` advances both.
    """

    def __init__(self, kv: KVCache, ssm: MambaCache):
        super().__init__(kv.batch, kv.device, kv.pad)
        self.kv, self.ssm = kv, ssm

    def tensors(self) -> list[torch.Tensor]:
        return [*self.kv.tensors(), *self.ssm.tensors()]

    def mask(self, T: int, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        return self.kv.mask(T, window)

    def advance(self, T: int) -> None:
        super().advance(T)
        self.kv.advance(T)
        self.ssm.advance(T)

    def reset(self) -> None:
        super().reset()
        self.kv.reset()
        self.ssm.reset()
