"""The GPT-2 family: a decoder-only Transformer (Radford et al. 2019), and its modern improvements.

Read top to bottom: config and presets, then the block, then the model.

GPT-2 is a stack of pre-norm residual blocks over token + learned position embeddings:

    x = wte[idx] + wpe[pos]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte^T            (the output head shares the embedding matrix)

The same file builds the "improved GPT-2" by config alone: rotary positions instead of a
learned table (``pos_emb="rope"``), grouped-query attention (``n_kv_head < n_head``), no biases,
and optionally RMSNorm and SwiGLU. Nothing branches on a model's name.

Answers to long contexts and large caches, also config fields (docs/ for each):
- ``pos_emb="alibi"``: linear attention biases instead of positions (Press et al. 2022);
- ``attention="linear"``: kernelized attention, an RNN at decoding time (Katharopoulos et al. 2020);
- ``attention="infini"``: local attention plus a compressive memory per layer (Munkhdalai et al. 2024);
- ``kv_share_every=s``: s adjacent layers share one set of keys/values (Brandon et al. 2024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from lmzoo.cache import KVCache, position_bound
from lmzoo.config import Config
from lmzoo.errors import ConfigError
from lmzoo.layers.alibi import alibi_bias, alibi_slopes
from lmzoo.layers.attention import CausalSelfAttention
from lmzoo.layers.chunked_ce import linear_cross_entropy
from lmzoo.layers.cross_layer_attention import CrossLayerAttention, kv_groups
from lmzoo.layers.infini_attention import InfiniAttention, InfiniCache
from lmzoo.layers.linear_attention import LinearAttentionState, LinearSelfAttention
from lmzoo.layers.mlp import kan_hidden, make_mlp, swiglu_hidden
from lmzoo.layers.moe import MoE, add_router_losses, combine_router_stats
from lmzoo.layers.norm import make_norm
from lmzoo.layers.rope import RotaryEmbedding
from lmzoo.models.base import LanguageModel, LMOutput, lm_loss


@dataclasses.dataclass
class GPTConfig(Config):
    vocab_size: int = 50257
    block_size: int = 1024  # longest context trained on (and the size of the learned position table)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 768
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "kan"] = "gelu_tanh"  # kan: layers/kan.py (Liu et al. 2024)
    mlp_hidden: int | None = None  # None = 4 * n_embd (GELU), Llama's 8/3 rule (SwiGLU), GELU's params (KAN)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    pos_emb: Literal["learned", "rope", "alibi", "none"] = "learned"  # "none": no positions (NoPE)
    rope_theta: float = 10000.0
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    attn_backend: Literal["sdpa", "reference"] = "sdpa"
    init_std: float = 0.02
    # Mixture of experts (layers/moe.py): n_experts > 0 replaces every MLP by n_experts MLPs of the
    # same kind, n_experts_per_tok of them run per token; the router losses join `loss` with these weights
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_aux_weight: float = 0.01  # Switch Transformer's alpha
    moe_z_weight: float = 0.0  # ST-MoE uses 0.001
    # Attention kind: "softmax" (the usual), "linear" (layers/linear_attention.py; constant-size decoding
    # state) or "infini" (layers/infini_attention.py: softmax inside segments + compressive memory)
    attention: Literal["softmax", "linear", "infini"] = "softmax"
    linear_feature_map: Literal["elu", "relu", "softplus"] = "elu"  # phi; the paper's is elu + 1
    linear_chunk: int = 64  # tokens per chunk of the parallel form (memory O(T * chunk))
    infini_segment: int = 64  # segment length of Infini-attention
    infini_delta_rule: bool = False  # delta-rule memory update instead of the plain additive one
    infini_gate_init: float = 0.0  # initial beta: the memory's share of the output is sigmoid(beta)
    # Cross-layer KV sharing (layers/cross_layer_attention.py): runs of this many adjacent layers share
    # the keys/values of the run's first layer; the KV cache shrinks by this factor (1: no sharing)
    kv_share_every: int = 1
    # Speed (docs/performance.md): the embedding/head rows are rounded up to a multiple of
    # vocab_multiple (128: tensor-core friendly shapes; 1 = exactly vocab_size, HF-compatible); the
    # padding rows are never returned as logits. ce_chunk > 0: the training loss runs the head and
    # cross-entropy ce_chunk tokens at a time (layers/chunked_ce.py; forward(idx, targets) then
    # returns logits None: they are never materialized)
    vocab_multiple: int = 1
    ce_chunk: int = 0

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head <= 0:
            raise ConfigError(f"n_kv_head must be positive, got {self.n_kv_head}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ConfigError(f"mlp_hidden must be positive, got {self.mlp_hidden}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps, rope_theta and init_std must be positive")
        if self.n_experts < 0 or self.n_experts == 1:
            raise ConfigError(f"n_experts must be 0 (dense) or at least 2, got {self.n_experts}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ConfigError(
                f"n_experts_per_tok must be in 1..{self.n_experts}, got {self.n_experts_per_tok}"
            )
        if self.linear_chunk <= 0 or self.infini_segment <= 0 or self.kv_share_every <= 0:
            raise ConfigError("linear_chunk, infini_segment and kv_share_every must be positive")
        if self.attention != "softmax" and self.pos_emb == "alibi":
            raise ConfigError(f"pos_emb=alibi biases softmax scores; attention={self.attention} has none")
        if self.attention == "linear" and self.pos_emb == "rope":
            raise ConfigError("attention=linear takes pos_emb learned or none (RoPE would break phi's positivity)")
        if self.attention != "softmax" and self.kv_share_every > 1:
            raise ConfigError(f"kv_share_every shares a KV cache; attention={self.attention} has none")
        if self.vocab_multiple <= 0 or self.ce_chunk < 0:
            raise ConfigError("vocab_multiple must be positive and ce_chunk >= 0 (0: plain cross-entropy)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "kan":
            return kan_hidden(self.n_embd)  # the width at which the KAN has the GELU MLP's parameters
        return swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd


# Shapes from the GPT-2 paper's table; the improved recipe keeps gpt2's size.
_IMPROVED = dict(pos_emb="rope", n_kv_head=4, bias=False, vocab_size=50304)
_CHAR_CPU = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, mlp="gelu")
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808 parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt2-improved": dict(n_layer=12, n_head=12, n_embd=768, **_IMPROVED),
    # nanoGPT's shakespeare_char "baby GPT" (a GPU recipe) and its CPU recipe
    "gpt2-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.2, mlp="gelu"),
    "gpt2-char-cpu": dict(**_CHAR_CPU),
    # lmzoo's improved CPU recipe (docs/improved-gpt2.md): RoPE, GQA, no biases, RMSNorm, SwiGLU
    "gpt2-improved-char-cpu": dict(
        _CHAR_CPU, pos_emb="rope", n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu"
    ),
    "gpt2-debug": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=97),
    # sparse mixture of experts (top-2 of 4, or 8 on the CPU recipe), everything else as above
    "gpt2-moe-debug": dict(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=97, n_experts=4
    ),
    "gpt2-moe-char-cpu": dict(_CHAR_CPU, n_experts=8, n_experts_per_tok=2),
}


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP, each on a normalized copy of the stream."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        args = (cfg.n_embd, cfg.n_head, cfg.n_kv_head)
        self.shares_kv = cfg.kv_share_every > 1
        if cfg.attention == "linear":
            self.attn = LinearSelfAttention(
                *args, cfg.bias, cfg.dropout, cfg.linear_feature_map, cfg.linear_chunk
            )
        elif cfg.attention == "infini":
            self.attn = InfiniAttention(
                *args, cfg.bias, cfg.dropout, cfg.attn_backend, segment=cfg.infini_segment,
                delta_rule=cfg.infini_delta_rule, gate_init=cfg.infini_gate_init,
            )
        elif self.shares_kv:  # the first layer of each run of kv_share_every makes the keys/values
            makes_kv = layer % cfg.kv_share_every == 0
            self.attn = CrossLayerAttention(
                *args, makes_kv, cfg.kv_share_every, cfg.bias, cfg.dropout, cfg.attn_backend
            )
        else:
            self.attn = CausalSelfAttention(*args, cfg.bias, cfg.dropout, cfg.attn_backend)
        self.ln_2 = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.moe = cfg.n_experts > 0
        if self.moe:
            self.mlp = MoE(
                cfg.n_embd, cfg.hidden, cfg.n_experts, cfg.n_experts_per_tok, cfg.mlp, cfg.bias, cfg.dropout
            )
        else:
            self.mlp = make_mlp(cfg.mlp, cfg.n_embd, cfg.hidden, cfg.bias, cfg.dropout)

    def forward(self, x, rope=None, mask=None, is_causal=True, cache=None, layer=0, kv=None):
        """x (B, T, C) -> (B, T, C), the router's statistics (RouterStats) in an MoE block (else None),
        and with cross-layer KV sharing the keys/values of this layer's group (else None)."""
        if self.shares_kv:
            a, kv = self.attn(self.ln_1(x), rope, mask, is_causal, cache, layer, kv)
        else:
            a = self.attn(self.ln_1(x), rope, mask, is_causal, cache, layer)
        x = x + a
        if self.moe:
            h, stats = self.mlp(self.ln_2(x))
        else:
            h, stats = self.mlp(self.ln_2(x)), None
        return x + h, stats, kv


class GPT(LanguageModel):
    family = "gpt2"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.pos_emb == "rope" else None
        # ALiBi's head slopes (n_head,): fixed, not learned, not saved
        self.register_buffer("alibi", alibi_slopes(cfg.n_head) if cfg.pos_emb == "alibi" else None, persistent=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialization.

        | weight                                   | init                              |
        |------------------------------------------|-----------------------------------|
        | embeddings, every Linear                 | normal(0, init_std=0.02)          |
        | residual projections (attn.proj, mlp out)| normal(0, 0.02 / sqrt(2*n_layer)) |
        | biases                                   | 0                                 |
        | norm weights                             | 1 (their own init)                |

        The scaled residual init keeps the residual stream's variance from growing with depth:
        each block adds two projections, so 2 * n_layer terms are summed.
        """
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):  # attn.proj, mlp.proj or mlp.down, and experts'
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> LMOutput:
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean loss.

        With a ``cache``, idx holds the next T tokens after those already cached.
        """
        B, T = idx.shape
        pos = cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)
        end = T if cache is None else position_bound(cache, T)  # bounds the positions (Python int: no sync)
        if self.wpe is not None and end > self.config.block_size:
            raise ValueError(
                f"{end} positions do not fit the learned position table (block_size "
                f"{self.config.block_size}); use a shorter context"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        rope = self.rope(pos, end) if self.rope is not None else None  # cos, sin: (T or B,T, hd)
        mask, is_causal = cache.mask(T) if cache is not None else (None, True)
        if self.alibi is not None:  # the distance penalty joins the causal/padding mask as a float bias
            mask, is_causal = alibi_bias(self.alibi, T, end, mask, is_causal, x.dtype), False
        stats, kv = [], None  # kv: the current group's keys/values under cross-layer KV sharing
        for i, block in enumerate(self.blocks):
            x, s, kv = block(x, rope, mask, is_causal, cache, i, kv)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        aux = combine_router_stats(stats) if stats else None  # MoE: router losses and expert loads
        if targets is not None:
            if self.config.ce_chunk:  # head + loss chunk by chunk: no (B, T, vocab) float32 logits
                logits = None
                loss = linear_cross_entropy(
                    x, self.lm_head.weight, targets, self.config.ce_chunk, self.config.vocab_size
                )
            else:
                logits = self._head(x)
                loss = lm_loss(logits, targets)
            if aux is not None:
                aux["lm_loss"] = loss.detach()
                loss = add_router_losses(loss, aux, self.config.moe_aux_weight, self.config.moe_z_weight)
            return LMOutput(logits, loss, aux)
        return LMOutput(self._head(x[:, -1:] if last_only else x), None, aux)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> logits (B, T, vocab_size): the padding rows of a padded vocabulary dropped."""
        logits = self.lm_head(x)
        return logits[..., : self.config.vocab_size] if logits.shape[-1] != self.config.vocab_size else logits

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None
    ) -> KVCache | LinearAttentionState | InfiniCache:
        """Decoding state for ``batch`` rows of up to ``max_len`` tokens (default block_size).

        A preallocated KV cache (one entry per K/V group with ``kv_share_every``); for linear
        attention the recurrent state (S, z), and for Infini-attention the memory plus one segment:
        both of a fixed size, ``max_len`` does not apply.
        """
        cfg = self.config
        dtype, device = dtype or self.dtype, device or self.device
        if cfg.attention == "linear":
            return LinearAttentionState(cfg.n_layer, batch, cfg.n_kv_head, cfg.head_dim, device=device, pad=pad)
        if cfg.attention == "infini":
            return InfiniCache(
                cfg.n_layer, batch, cfg.n_kv_head, cfg.head_dim, cfg.infini_segment, dtype, device, pad
            )
        return KVCache(
            kv_groups(cfg.n_layer, cfg.kv_share_every),
            batch,
            cfg.n_kv_head,
            cfg.head_dim,
            max_len or cfg.block_size,
            dtype=dtype,
            device=device,
            pad=pad,
        )

    def max_positions(self) -> int | None:
        """Longest sequence the position encoding allows (None: unbounded, e.g. RoPE, ALiBi)."""
        return self.config.block_size if self.wpe is not None else None

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context (e.g. load GPT-2 with 1024 and train at 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ConfigError(f"crop_block_size: {block_size} is not in 1..{self.config.block_size}")
        self.config.block_size = block_size
        if self.wpe is not None:
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())
            self.wpe.num_embeddings = block_size

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:

        6 * N for the matmuls with the weights (2 forward, 4 backward; N without the position
        table, the tied head counted once as it is used once) plus 12 * L * d * T for the
        attention scores and weighted sum, where d = n_head * head_dim and T the context.
        Linear attention scores only inside a chunk and carries a (head_dim x head_dim) state per
        head; Infini-attention scores inside a segment and reads a memory of that size.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        if cfg.attention == "linear":
            T = min(T, cfg.linear_chunk) + cfg.head_dim
        elif cfg.attention == "infini":
            T = min(T, cfg.infini_segment) + cfg.head_dim
        return 6 * self.active_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
