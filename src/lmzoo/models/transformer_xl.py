"""Transformer-XL (Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context").

Read top to bottom: config and presets, the memory, relative attention, the block, the model.

A vanilla Transformer LM trained on fixed-length segments sees no context across a segment
boundary. Transformer-XL keeps, for every layer, the hidden states of the previous segment(s)
as a **memory** and lets the current segment attend over [memory; segment]:

    h~^{l-1}_s = [ stop_gradient(m^{l-1}_{s}) ; h^{l-1}_s ]        m: the last mem_len hidden states
    q = h^{l-1}_s W_q,   k, v = h~^{l-1}_s W_k, h~^{l-1}_s W_v
    h^l_s = block(q, k, v)

so the context grows by mem_len per layer: the longest dependency is about n_layer * mem_len.
No gradient flows into the memory (it is stored detached): training costs one segment's
backward, and evaluation may keep a longer memory than training did.

Absolute positions cannot work with a memory: token 0 of this segment and token 0 of the
previous one would get the same embedding. XL therefore scores with **relative** positions.
With R_{i-j} the sinusoid encoding of the distance and two learned vectors u, v per head:

    score(i, j) = (q_i + u)^T k_j  +  (q_i + v)^T W_R R_{i-j}
                    (a) content + (c) global content bias    (b) content-dependent position
                                                              + (d) global position bias

Term (b + d) is computed for all distances at once, (T, S) with S = mem + T, then gathered
into place by distance; it enters SDPA as an additive float mask, so the fused kernels still
do the softmax and the weighted sum.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lmzoo.cache import DecodingState
from lmzoo.errors import ConfigError
from lmzoo.layers.attention import attend
from lmzoo.layers.mlp import MLP
from lmzoo.layers.norm import LayerNorm
from lmzoo.models.base import Block, Blocks, Context, LanguageModel, ModelConfig, renamed


@dataclasses.dataclass
class TransformerXLConfig(ModelConfig):
    vocab_size: int = 267735  # WikiText-103's word vocabulary
    block_size: int = 150  # segment length trained on (the paper's tgt_len)
    mem_len: int = 150  # hidden states kept per layer for the next segment (0: a vanilla Transformer)
    n_layer: int = 16
    n_head: int = 10
    n_embd: int = 410
    d_head: int | None = None  # None = n_embd // n_head
    d_inner: int | None = None  # feed-forward width; None = 4 * n_embd
    pre_norm: bool = False  # the paper's default is post-norm: x = LN(x + f(x))
    clamp_len: int | None = None  # distances past this share the encoding of clamp_len (None: no clamp)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_backend: str = "sdpa"  # or "reference"
    init_std: float = 0.02

    def validate(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.mem_len < 0:
            raise ConfigError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.d_head is None and self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set d_head")
        if self.n_embd % 2:
            raise ConfigError(f"the sinusoid encoding needs an even n_embd, got {self.n_embd}")
        self.require_positive("d_head", "d_inner", "clamp_len", optional=True)
        self.check_dropout()
        if self.attn_backend not in ("sdpa", "reference"):
            raise ConfigError(f"attn_backend must be sdpa or reference, got {self.attn_backend!r}")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.d_inner or 4 * self.n_embd


# The paper's WikiText-103 base model (151M with its adaptive softmax) and small CPU models.
PRESETS: dict[str, dict] = {
    "transformer-xl-base": dict(n_layer=16, n_head=10, n_embd=410, d_head=41, d_inner=2100, dropout=0.1),
    "transformer-xl-char-cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, mem_len=64, vocab_size=65, pre_norm=True
    ),
    "transformer-xl-debug": dict(n_layer=2, n_head=4, n_embd=32, block_size=32, mem_len=32, vocab_size=97),
}


class XLMemory(DecodingState):
    """The decoding state (and training memory) of Transformer-XL: per layer, the input hidden states
    of the last ``mem_len`` tokens, (B, M, n_embd) with M <= mem_len, stored without gradient.

    Per forward chunk of T tokens: ``mask(T)`` once, then in every layer ``memory(layer)`` (what
    it attends over besides the chunk) and ``stage(layer, x)`` (the layer's input, for the next
    chunk); ``advance(T)`` takes the staged states in. Memory is bounded by ``mem_len``: once full,
    the oldest states are dropped (so cached decoding equals the full forward while the sequence
    fits in ``mem_len``, and XL's bounded context after). Left-padded rows: padding states are kept
    but masked out, like a KV cache's padding keys.
    """

    buffers = ("mems",)  # a list: one tensor per layer

    def __init__(self, n_layer: int, batch: int, n_embd: int, mem_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", pad: torch.Tensor | None = None):
        super().__init__(batch, device, pad)
        self.mem_len = mem_len
        self.mems = [torch.zeros(batch, 0, n_embd, dtype=dtype, device=device) for _ in range(n_layer)]
        self.staged: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return self.mems[0].shape[1]

    def reset(self) -> None:
        super().reset()
        self.mems = [m[:, :0] for m in self.mems]
        self.staged = {}

    def mask(self, T: int) -> torch.Tensor:
        """Bool (B or 1, 1, T, M + T), True = may attend: causal over [memory; new], padding hidden."""
        M = self.length
        q = torch.arange(self.pos, self.pos + T, device=self.device)[:, None]  # absolute slots
        k = torch.arange(self.pos - M, self.pos + T, device=self.device)[None, :]
        return self.with_padding(k <= q, q, k)

    def memory(self, layer: int) -> torch.Tensor:
        return self.mems[layer]

    def stage(self, layer: int, x: torch.Tensor) -> None:
        """The layer's T new input states, kept (without gradient) once the chunk is done."""
        self.staged[layer] = x.detach()

    def advance(self, T: int) -> None:
        """Append every layer's staged states, keep the last ``mem_len``."""
        if self.mem_len:
            self.mems = [torch.cat([m, self.staged[i]], dim=1)[:, -self.mem_len :] if i in self.staged else m
                         for i, m in enumerate(self.mems)]
        self.staged = {}
        super().advance(T)


@dataclasses.dataclass
class XLContext(Context):
    """The chunk's context plus the relative position encodings every layer projects."""

    r: torch.Tensor | None = None  # (S, n_embd) encodings of the distances S-1 .. 0 (S = memory + chunk)


def sinusoid_encoding(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """R: (S,) distances -> (S, dim) [sin(d * f_i), cos(d * f_i)] with f_i = 10000^(-2i/dim) (Vaswani et al.)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativeAttention(nn.Module):
    """Multi-head attention of the T new states over [memory; new] with relative positions and u, v."""

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        nh, hd, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        self.n_head, self.head_dim = nh, hd
        self.q = nn.Linear(C, nh * hd, bias=False)
        self.kv = nn.Linear(C, 2 * nh * hd, bias=False)
        self.r_net = nn.Linear(C, nh * hd, bias=False)  # W_R: position encodings -> per-head keys
        self.u = nn.Parameter(torch.zeros(nh, hd))  # global content bias
        self.v = nn.Parameter(torch.zeros(nh, hd))  # global position bias
        self.proj = nn.Linear(nh * hd, C, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.backend = cfg.attn_backend

    def forward(self, h: torch.Tensor, mem: torch.Tensor | None, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) new states; mem (B, M, C) or None; r (S, C) encodings of distances S-1 .. 0
        (S = M + T); mask bool (B or 1, 1, T, S). Returns (B, T, C)."""
        B, T, _ = h.shape
        nh, hd = self.n_head, self.head_dim
        hm = torch.cat([mem, h], dim=1) if mem is not None and mem.shape[1] else h  # (B, S, C)
        S = hm.shape[1]
        q = self.q(h).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v = self.kv(hm).view(B, S, 2, nh, hd).permute(2, 0, 3, 1, 4)  # each (B, nh, S, hd)
        rk = self.r_net(r.to(h.dtype)).view(S, nh, hd).transpose(0, 1)  # (nh, S, hd): column m <-> distance S-1-m
        # (b) + (d): (q + v) . W_R R for every distance, then moved into place. Query i sits at slot
        # M + i, so key j is at distance M + i - j, found in column S-1-(M+i-j) = T-1-i+j.
        bd = (q + self.v[:, None].to(q.dtype)) @ rk.transpose(-1, -2)  # (B, nh, T, S) by distance
        i = torch.arange(T, device=h.device)[:, None]
        j = torch.arange(S, device=h.device)[None, :]
        column = (T - 1 - i + j).clamp(max=S - 1)  # future keys (masked anyway) clamp to distance 0
        bd = bd.gather(-1, column.expand(B, nh, T, S))
        bias = (bd / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
        # (a) + (c): SDPA computes (q + u) . k / sqrt(hd) and adds the bias before its softmax
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q + self.u[:, None].to(q.dtype), k, v, bias, False, dropout_p, self.backend)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.resid_dropout(self.proj(y))


class XLBlock(Block):
    """Relative attention over [memory; segment], then a ReLU feed-forward; post-norm as in the paper
    (``pre_norm=True``: normalize each branch's input instead, the memory included)."""

    def __init__(self, cfg: TransformerXLConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.mixer_norm = LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mixer = RelativeAttention(cfg)
        self.ffn_norm = LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ffn = MLP(cfg.n_embd, cfg.hidden, bias=True, activation="relu", dropout=cfg.dropout, hidden_dropout=True)

    def forward(self, x: torch.Tensor, ctx: XLContext, layer: int):
        """x (B, T, C) this layer's input -> (B, T, C); the memory comes from (and x goes to) the cache."""
        mem = None
        if ctx.cache is not None:
            mem = ctx.cache.memory(layer)
            ctx.cache.stage(layer, x)
        mask, _ = ctx.mask()
        if self.pre_norm:
            x = x + self.mixer(self.mixer_norm(x), self.mixer_norm(mem) if mem is not None else None, ctx.r, mask)
            return x + self.ffn(self.ffn_norm(x)), None
        x = self.mixer_norm(x + self.mixer(x, mem, ctx.r, mask))
        return self.ffn_norm(x + self.ffn(x)), None


class TransformerXL(LanguageModel):
    family = "transformer-xl"
    config_class = TransformerXLConfig
    # its feed-forward sat on the block as fc/proj (renamed before attn: attn.proj is the attention's)
    legacy_names = ((r"(?<![\w])(blocks\.\d+)\.(fc|proj)(?![\w])", r"\1.ffn.\2"),) + renamed(
        ("wte", "embed"), ("ln_1", "mixer_norm"), ("attn", "mixer"), ("ln_2", "ffn_norm"), ("ln_f", "norm"),
        ("lm_head", "head"))

    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = Blocks(XLBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.pre_norm else None  # post-norm: the blocks'
        self.make_head(cfg.vocab_size, cfg.tie_embeddings)
        self.init_weights()

    def init_weights(self) -> None:
        """| weight                                  | init                              |
        |-----------------------------------------|-----------------------------------|
        | embedding, q, kv, r_net, ffn.fc, u, v   | normal(0, init_std=0.02)          |
        | residual projections (mixer, ffn proj)  | normal(0, 0.02 / sqrt(2*n_layer)) |
        | biases                                  | 0;  LayerNorm weights 1           |
        """
        std = self.config.init_std
        self.init_normal(std)
        with torch.no_grad():  # one pass in parameter order (u, v and the projections draw in turn)
            for name, p in self.named_parameters():
                if name.endswith(("mixer.u", "mixer.v")):
                    nn.init.normal_(p, mean=0.0, std=std)
                elif name.endswith("proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def relative_encoding(self, S: int, device: torch.device) -> torch.Tensor:
        """(S, n_embd) encodings of the distances S-1, ..., 1, 0 (clamped to ``clamp_len``)."""
        dist = torch.arange(S - 1, -1, -1, device=device)
        if self.config.clamp_len is not None:
            dist = dist.clamp(max=self.config.clamp_len)
        return sinusoid_encoding(dist, self.config.n_embd)

    def begin(self, idx: torch.Tensor, cache: XLMemory | None) -> tuple[torch.Tensor, XLContext]:
        """The token embedding (no position embedding: positions are relative), the mask over
        [memory; chunk] and the relative encodings of its S distances.

        With ``cache`` (an :class:`XLMemory`, from :meth:`init_cache`), the T tokens continue the
        cached ones: every layer attends over its memory, which then takes in the new states.
        That is how XL trains over consecutive segments, and how it decodes.
        """
        T = idx.shape[1]
        if cache is not None:
            mask = cache.mask(T)
        else:
            mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]
        r = self.drop(self.relative_encoding(mask.shape[-1], idx.device))
        x = idx if idx.is_floating_point() else self.drop(self.embed(idx))  # (B, T, C)
        return x, XLContext(cache, None, {None: (mask, False)}, r=r)

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> XLMemory:
        """A memory of ``max_len`` states per layer (default ``mem_len``; larger than the training
        ``mem_len`` is fine: evaluation with a longer memory is one of XL's results). It cannot roll back."""
        cfg = self.config
        return XLMemory(
            cfg.n_layer, batch, cfg.n_embd, cfg.mem_len if max_len is None else max_len,
            dtype=dtype or self.dtype, device=device or self.device, pad=pad,
        )

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """6 * N for the weights plus, per layer, three (T x S) products (content scores, position scores,
        weighted sum): 18 * L * d * S keys (PaLM appendix B's counting). The memory is attended only in a
        forward with a cache (training with ``recurrence=True``): then ``recurrent=True`` and S = seq_len +
        mem_len (the full memory, after the first segment); without one S = seq_len."""
        cfg = self.config
        S = (seq_len or cfg.block_size) + (cfg.mem_len if recurrent else 0)
        return 6 * self.num_params(non_embedding=True) + 18 * cfg.n_layer * cfg.n_head * cfg.head_dim * S
