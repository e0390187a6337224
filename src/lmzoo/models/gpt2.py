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
from typing import Literal

import torch
from torch import nn

from lmzoo.cache import DecodingState, KVCache
from lmzoo.errors import ConfigError
from lmzoo.layers.alibi import alibi_bias, alibi_slopes
from lmzoo.layers.attention import CausalSelfAttention
from lmzoo.layers.cross_layer_attention import CrossLayerAttention, kv_groups
from lmzoo.layers.infini_attention import InfiniAttention, InfiniCache
from lmzoo.layers.linear_attention import LinearAttentionState, LinearSelfAttention
from lmzoo.layers.mlp import kan_hidden, make_mlp, swiglu_hidden
from lmzoo.layers.moe import MoE
from lmzoo.layers.norm import make_norm
from lmzoo.layers.rope import RotaryEmbedding
from lmzoo.models.base import Block, Blocks, Context, LanguageModel, ModelConfig, attention_flops, renamed


@dataclasses.dataclass
class GPTConfig(ModelConfig):
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
        self.require_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.check_heads()
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"RoPE needs an even head dimension, got {self.n_embd // self.n_head}")
        self.check_dropout()
        self.require_positive("mlp_hidden", optional=True)
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps, rope_theta and init_std must be positive")
        self.check_experts()
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


class GPTBlock(Block):
    """Pre-norm residual block: the mixer (attention of the configured kind) then the MLP (or a
    mixture of MLP experts), each on a normalized copy of the stream."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.mixer_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        args = (cfg.n_embd, cfg.n_head, cfg.n_kv_head)
        self.shares_kv = cfg.kv_share_every > 1
        self.group = layer // cfg.kv_share_every  # the K/V group of cross-layer sharing
        if cfg.attention == "linear":
            self.mixer = LinearSelfAttention(
                *args, cfg.bias, cfg.dropout, cfg.linear_feature_map, cfg.linear_chunk
            )
        elif cfg.attention == "infini":
            self.mixer = InfiniAttention(
                *args, cfg.bias, cfg.dropout, cfg.attn_backend, segment=cfg.infini_segment,
                delta_rule=cfg.infini_delta_rule, gate_init=cfg.infini_gate_init,
            )
        elif self.shares_kv:  # the first layer of each run of kv_share_every makes the keys/values
            makes_kv = layer % cfg.kv_share_every == 0
            self.mixer = CrossLayerAttention(
                *args, makes_kv, cfg.kv_share_every, cfg.bias, cfg.dropout, cfg.attn_backend
            )
        else:
            self.mixer = CausalSelfAttention(*args, cfg.bias, cfg.dropout, cfg.attn_backend)
        self.ffn_norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        if cfg.n_experts > 0:
            self.ffn = MoE(
                cfg.n_embd, cfg.hidden, cfg.n_experts, cfg.n_experts_per_tok, cfg.mlp, cfg.bias, cfg.dropout
            )
        else:
            self.ffn = make_mlp(cfg.mlp, cfg.n_embd, cfg.hidden, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int):
        """x (B, T, C) -> (B, T, C) and the router's statistics (RouterStats) in an MoE block (else None).

        With cross-layer KV sharing the group's keys/values travel in ``ctx.shared[group]``: the
        group's first layer writes them, the others read them."""
        h, (mask, is_causal) = self.mixer_norm(x), ctx.mask()
        if self.shares_kv:
            a, ctx.shared[self.group] = self.mixer(h, ctx.rope, mask, is_causal, ctx.cache, layer,
                                                   ctx.shared.get(self.group))
        else:
            a = self.mixer(h, ctx.rope, mask, is_causal, ctx.cache, layer)
        return self.feed_forward(x + a)


class GPT(LanguageModel):
    family = "gpt2"
    config_class = GPTConfig
    input_parts = ("embed", "pos_embed")
    # the names GPT-2's checkpoint uses (nanoGPT's), which lmzoo used before the shared part names
    legacy_names = renamed(("wte", "embed"), ("wpe", "pos_embed"), ("ln_1", "mixer_norm"), ("attn", "mixer"),
                           ("ln_2", "ffn_norm"), ("mlp", "ffn"), ("ln_f", "norm"), ("lm_head", "head"))

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.ce_chunk = cfg.ce_chunk
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.pos_emb == "rope" else None
        # ALiBi's head slopes (n_head,): fixed, not learned, not saved
        self.register_buffer("alibi", alibi_slopes(cfg.n_head) if cfg.pos_emb == "alibi" else None, persistent=False)
        self.static_decoding = cfg.pos_emb != "alibi"  # ALiBi's biases need the true key count, not a bound
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = Blocks(GPTBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.make_head(cfg.padded_vocab_size, cfg.tie_embeddings)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialization.

        | weight                                     | init                              |
        |--------------------------------------------|-----------------------------------|
        | embeddings, every Linear                   | normal(0, init_std=0.02)          |
        | residual projections (mixer.proj, ffn out) | normal(0, 0.02 / sqrt(2*n_layer)) |
        | biases                                     | 0                                 |
        | norm weights                               | 1 (their own init)                |

        The scaled residual init keeps the residual stream's variance from growing with depth:
        each block adds two projections, so 2 * n_layer terms are summed.
        """
        self.init_normal(self.config.init_std)
        self.init_residual(self.config.init_std, ("proj.weight", "down.weight"))  # experts' too

    def begin(self, idx: torch.Tensor, cache: DecodingState | None) -> tuple[torch.Tensor, Context]:
        """Token + position embeddings, and the chunk's rotary tables or ALiBi biases and masks."""
        T = idx.shape[1]
        pos = cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)
        end = T if cache is None else cache.bound(T)  # bounds the positions (Python int: no sync)
        if self.pos_embed is not None and end > self.config.block_size:
            raise ValueError(
                f"{end} positions do not fit the learned position table (block_size "
                f"{self.config.block_size}); use a shorter context"
            )
        if idx.is_floating_point():  # a later pipeline stage: the previous stage's hidden states
            x = idx
        else:
            x = self.embed(idx)  # (B, T, C)
            if self.pos_embed is not None:
                x = x + self.pos_embed(pos)
            x = self.drop(x)
        rope = self.rope(pos, end) if self.rope is not None else None  # cos, sin: (T or B,T, hd)
        mask, is_causal = cache.mask(T) if cache is not None else (None, True)
        if self.alibi is not None:  # the distance penalty joins the causal/padding mask as a float bias
            mask, is_causal = alibi_bias(self.alibi, T, end, mask, is_causal, x.dtype), False
        return x, Context(cache, rope, {None: (mask, is_causal)})

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> KVCache | LinearAttentionState | InfiniCache:
        """Decoding state for ``batch`` rows of up to ``max_len`` tokens (default block_size).

        A preallocated KV cache (one entry per K/V group with ``kv_share_every``); for linear
        attention the recurrent state (S, z), and for Infini-attention the memory plus one segment:
        both of a fixed size (``max_len`` does not apply) and unable to roll back.
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
        return self.config.block_size if self.config.pos_emb == "learned" else None

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context (e.g. load GPT-2 with 1024 and train at 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ConfigError(f"crop_block_size: {block_size} is not in 1..{self.config.block_size}")
        self.config.block_size = block_size
        if self.pos_embed is not None:
            self.pos_embed.weight = nn.Parameter(self.pos_embed.weight[:block_size].detach().clone())
            self.pos_embed.num_embeddings = block_size

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
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
        return 6 * self.active_params() + attention_flops(cfg.n_head * cfg.head_dim, [T] * cfg.n_layer)
