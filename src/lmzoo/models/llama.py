"""The Llama family: Llama 2 (Touvron et al. 2023), Mistral 7B (Jiang et al. 2023) and Mixtral
(Jiang et al. 2024, "Mixtral of Experts"), three models that differ only by configuration.

Read top to bottom: config and presets, then the block, then the model.

Llama is GPT-2's pre-norm decoder with four substitutions, each its own paper:

    x = wte[idx]                                   no position table: positions enter through RoPE
    for each block:
        x = x + attn(rmsnorm(x))                   RoPE on q and k; grouped-query attention; no biases
        x = x + swiglu(rmsnorm(x))                 down(silu(gate(x)) * up(x))
    logits = rmsnorm(x) @ lm_head^T                an output matrix separate from the embedding

- RMSNorm (Zhang & Sennrich 2019), docs/rmsnorm.md: LayerNorm without mean and bias.
- SwiGLU (Shazeer 2020), docs/swiglu.md: a gated MLP, hidden width 8/3 d rounded up.
- RoPE (Su et al. 2021), lmzoo/layers/rope.py, with optional context-extension scaling
  (``rope_scaling``: linear interpolation, static NTK-aware, or YaRN).
- Grouped-query attention (Ainslie et al. 2023): ``n_kv_head`` < ``n_head`` (Llama 2 70B, Mistral).

Mistral adds **sliding-window attention** (``sliding_window``; docs/sliding-window.md): each
query sees only the last ``sliding_window`` keys, and decoding keeps a ring buffer of that size
(:class:`~lmzoo.cache.RollingKVCache`). ``window_pattern`` mixes local ('L') and global ('G')
layers. Mixtral replaces the MLP by a **sparse mixture of experts** (``n_experts`` > 0;
docs/moe.md): a router sends each token to ``n_experts_per_tok`` of the experts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from lmzoo.cache import DecodingState, KVCache, RollingKVCache
from lmzoo.errors import ConfigError
from lmzoo.layers.attention import CausalSelfAttention, layer_windows, window_mask
from lmzoo.layers.infini_attention import InfiniAttention, InfiniCache
from lmzoo.layers.mlp import SwiGLU, swiglu_hidden
from lmzoo.layers.moe import MoE
from lmzoo.layers.norm import RMSNorm
from lmzoo.layers.rope import ScaledRotaryEmbedding
from lmzoo.models.base import Block, Blocks, Context, LanguageModel, ModelConfig, attention_flops, renamed


@dataclasses.dataclass
class LlamaConfig(ModelConfig):
    vocab_size: int = 32000
    block_size: int = 4096  # context trained on (RoPE itself is not bounded by it)
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = n_head; fewer = grouped-query attention
    n_embd: int = 4096
    head_dim: int | None = None  # None = n_embd // n_head (some checkpoints set it apart)
    mlp_hidden: int | None = None  # None = Llama's rule: 8/3 * n_embd rounded up to a multiple of 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE context extension (layers/rope.py): "linear" (position interpolation), "ntk" (static
    # NTK-aware base), "yarn" (NTK-by-parts + attention temperature); rope_factor = new / old context
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max: int | None = None  # yarn: the context before extension (None = block_size)
    rope_beta_fast: float = 32.0  # yarn: frequencies rotating more than this in the old context are kept
    rope_beta_slow: float = 1.0  # yarn: ... and less than this are interpolated
    rope_attention_factor: float | None = None  # cos/sin multiplier; None = 0.1 ln(factor) + 1 for yarn
    sliding_window: int | None = None  # None = full causal attention (Llama); Mistral 7B: 4096
    window_pattern: str = ""  # 'L' local / 'G' global, cycled over layers; "" = all local
    n_experts: int = 0  # 0 = dense SwiGLU MLP; > 1 = sparse mixture of SwiGLU experts (Mixtral: 8)
    n_experts_per_tok: int = 2  # top-k routing
    moe_aux_weight: float = 0.02  # weight of the load-balancing loss (Mixtral's router_aux_loss_coef)
    moe_z_weight: float = 0.0  # weight of the router z-loss (ST-MoE uses 0.001)
    # "infini": softmax attention inside segments + a compressive memory across them (layers/infini_attention.py;
    # lmzoo.models.infini.to_infini turns a pretrained model into one)
    attention: Literal["softmax", "infini"] = "softmax"
    infini_segment: int = 2048
    infini_delta_rule: bool = False
    infini_gate_init: float = 0.0  # initial beta: the memory's share of the output is sigmoid(beta)
    tie_embeddings: bool = False
    dropout: float = 0.0  # Llama trains without dropout; here for small-data experiments
    attn_backend: Literal["sdpa", "reference"] = "sdpa"
    init_std: float = 0.02

    def validate(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        self.check_heads()
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim"
            )
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"RoPE needs a positive even head dimension, got {self.head_dim}")
        self.require_positive("mlp_hidden", "sliding_window", optional=True)
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps, rope_theta and init_std must be positive")
        if self.rope_scaling != "none" and self.rope_factor < 1:
            raise ConfigError(f"rope_factor must be >= 1 to extend the context, got {self.rope_factor}")
        if set(self.window_pattern) - {"L", "G"}:
            raise ConfigError(f"window_pattern takes 'L' (local), 'G' (global); got {self.window_pattern!r}")
        if self.window_pattern and self.sliding_window is None:
            raise ConfigError("window_pattern needs a sliding_window for its local layers")
        self.check_experts()
        self.check_dropout()
        self.require_positive("infini_segment")
        if self.attention == "infini" and self.sliding_window is not None:
            raise ConfigError("attention=infini already attends locally (within segments): drop sliding_window")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or swiglu_hidden(self.n_embd, multiple_of=256)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's attention window (None = global)."""
        return layer_windows(self.n_layer, self.sliding_window, self.window_pattern)


# Shapes from the papers' tables (and the released config.json files).
_MISTRAL = dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, mlp_hidden=14336, block_size=32768)
_DEBUG = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, block_size=32, vocab_size=97)
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008),  # 6,738,415,616 parameters
    "llama2-13b": dict(n_layer=40, n_head=40, n_embd=5120, mlp_hidden=13824),  # 13,015,864,320
    "llama2-70b": dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, mlp_hidden=28672),  # 68,976,648,192
    "mistral-7b": dict(_MISTRAL, sliding_window=4096),  # 7,241,732,096
    "mixtral-8x7b": dict(_MISTRAL, n_experts=8, n_experts_per_tok=2, rope_theta=1e6),  # 46,702,792,704
    "llama-debug": dict(_DEBUG),
    "mistral-debug": dict(_DEBUG, sliding_window=8),
    "mixtral-debug": dict(_DEBUG, n_experts=4, n_experts_per_tok=2),
    # a small Mixtral for CPU experiments on tiny Shakespeare (char vocabulary)
    "mixtral-char-cpu": dict(
        n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=256, block_size=64, vocab_size=65,
        n_experts=8, n_experts_per_tok=2,
    ),
}


class LlamaBlock(Block):
    """Pre-norm residual block: RMSNorm -> attention, RMSNorm -> SwiGLU (or mixture of SwiGLU experts)."""

    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.window = cfg.windows[layer]  # its attention window (None: global)
        self.mixer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if cfg.attention == "infini":
            self.mixer = InfiniAttention(
                cfg.n_embd, cfg.n_head, cfg.n_kv_head, bias=False, dropout=cfg.dropout, backend=cfg.attn_backend,
                head_dim=cfg.head_dim, segment=cfg.infini_segment, delta_rule=cfg.infini_delta_rule,
                gate_init=cfg.infini_gate_init,
            )
        else:
            self.mixer = CausalSelfAttention(
                cfg.n_embd, cfg.n_head, cfg.n_kv_head, bias=False, dropout=cfg.dropout,
                backend=cfg.attn_backend, head_dim=cfg.head_dim,
            )
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if cfg.n_experts > 0:
            self.ffn = MoE(
                cfg.n_embd, cfg.hidden, cfg.n_experts, cfg.n_experts_per_tok, "swiglu", False, cfg.dropout
            )
        else:
            self.ffn = SwiGLU(cfg.n_embd, cfg.hidden, bias=False, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int):
        """x (B, T, C) -> (B, T, C), and the router's statistics in a mixture-of-experts block."""
        mask, is_causal = ctx.mask(self.window)
        return self.feed_forward(x + self.mixer(self.mixer_norm(x), ctx.rope, mask, is_causal, ctx.cache, layer))


class Llama(LanguageModel):
    family = "llama"
    config_class = LlamaConfig
    legacy_names = renamed(("wte", "embed"), ("attn_norm", "mixer_norm"), ("attn", "mixer"),
                           ("mlp_norm", "ffn_norm"), ("mlp", "ffn"), ("norm_f", "norm"), ("lm_head", "head"))

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = cfg = config
        self.windows = cfg.windows  # read once: begin builds one mask per distinct window
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.rope = ScaledRotaryEmbedding(
            cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
            cfg.rope_original_max or cfg.block_size, cfg.rope_beta_fast, cfg.rope_beta_slow,
            cfg.rope_attention_factor,
        )
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = Blocks(LlamaBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.make_head(cfg.vocab_size, cfg.tie_embeddings)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialization (Llama's paper does not state one; this is GPT-2's scaled initialization).

        | weight                                          | init                              |
        |-------------------------------------------------|-----------------------------------|
        | embedding, head, q/k/v, gate/up, router         | normal(0, init_std=0.02)          |
        | residual projections (mixer.proj, every down)   | normal(0, 0.02 / sqrt(2*n_layer)) |
        | RMSNorm weights                                 | 1                                 |

        Scaling the projections into the residual stream keeps its variance from growing with depth.
        """
        self.init_normal(self.config.init_std)
        self.init_residual(self.config.init_std, ("mixer.proj.weight", "down.weight"))

    def begin(self, idx: torch.Tensor, cache: DecodingState | None) -> tuple[torch.Tensor, Context]:
        """The token embedding, the chunk's rotary tables, and one mask per distinct attention window
        (usually one; two for a local/global pattern)."""
        T = idx.shape[1]
        pos = cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)
        end = T if cache is None else cache.bound(T)  # bounds the positions (Python int: no sync)
        x = idx if idx.is_floating_point() else self.drop(self.embed(idx))  # (B, T, C)
        masks = {w: cache.mask(T, w) if cache is not None else window_mask(T, w, idx.device) for w in set(self.windows)}
        return x, Context(cache, self.rope(pos, end), masks)

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> KVCache | RollingKVCache | InfiniCache:
        """Decoding state for ``batch`` rows of up to ``max_len`` tokens (default block_size).

        With a sliding window a :class:`RollingKVCache`: its windowed layers keep only
        ``sliding_window`` slots, so generation of any length takes constant memory; ``rollback``
        asks for one full-length :class:`KVCache` instead (a ring cannot forget its newest tokens).
        """
        cfg = self.config
        args = (batch, cfg.n_kv_head, cfg.head_dim, max_len or cfg.block_size)
        kw = dict(dtype=dtype or self.dtype, device=device or self.device, pad=pad)
        if cfg.attention == "infini":  # memory + one segment: a fixed size, max_len does not apply
            return InfiniCache(cfg.n_layer, batch, cfg.n_kv_head, cfg.head_dim, cfg.infini_segment, **kw)
        if any(w is not None for w in self.windows) and not rollback:
            return RollingKVCache(self.windows, *args, **kw)
        return KVCache(cfg.n_layer, *args, **kw)

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """Training FLOPs per token, PaLM appendix B: 6 * N_active + 12 * sum_layers(d * T_layer).

        N_active counts only the experts a token runs (``active_params``); T_layer is the context
        a query of that layer attends to, min(T, window) with a sliding window.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        if cfg.attention == "infini":  # scores inside a segment, a (head_dim x head_dim) memory read
            T = min(T, cfg.infini_segment) + cfg.head_dim
        return 6 * self.active_params() + attention_flops(
            cfg.n_head * cfg.head_dim, [min(T, w) if w else T for w in self.windows]
        )
