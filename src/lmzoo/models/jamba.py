"""Jamba (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model").

Read top to bottom: config and presets, then the block, then the model.

Jamba interleaves the two ways of mixing tokens. Most layers are Mamba layers (a selective
state space: linear cost, a fixed-size state); one layer in ``attn_every`` is a Transformer
attention layer (exact recall over the whole context, at the price of a KV cache). Every block
then has a feed-forward part, and one block in ``moe_every`` makes it a mixture of experts:

    x = wte[idx]                                      no position encoding anywhere: the Mamba
    for layer i:                                      layers tell the attention layers the order
        mixer = attention if i % attn_every == attn_offset else mamba
        ffn   = MoE       if i % moe_every  == moe_offset  else SwiGLU
        x = x + mixer(rmsnorm(x))
        x = x + ffn(rmsnorm(x))
    logits = rmsnorm(x) @ lm_head^T

Jamba v0.1: 32 layers, attention 1 in 8 (offset 4), MoE 1 in 2 (offset 1) with 16 experts, top 2:
52B parameters, 12B active per token, and a KV cache 8x smaller than an all-attention model's.
Its Mamba layers add RMSNorms on Δ, B and C (``inner_norms``), which the paper found to
stabilize training at scale. Its router weights the two chosen experts by their probabilities
under the softmax over all experts, without renormalizing them (unlike Mixtral).

Decoding state: one :class:`~lmzoo.cache.HybridCache` holding a KV cache for the attention
layers and a :class:`~lmzoo.cache.MambaCache` for the Mamba layers, each numbered among its own kind.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from lmzoo.cache import DecodingState, HybridCache, KVCache, MambaCache
from lmzoo.errors import ConfigError
from lmzoo.layers.attention import CausalSelfAttention
from lmzoo.layers.mlp import SwiGLU
from lmzoo.layers.moe import MoE
from lmzoo.layers.norm import RMSNorm
from lmzoo.layers.ssm import SelectiveSSM
from lmzoo.models.base import Block, Blocks, Context, LanguageModel, ModelConfig, attention_flops, renamed


@dataclasses.dataclass
class JambaConfig(ModelConfig):
    vocab_size: int = 65536
    block_size: int = 4096  # context trained on; nothing in the model is bounded by it
    n_layer: int = 32
    n_embd: int = 4096
    n_head: int = 32
    n_kv_head: int | None = 8  # None = n_head
    mlp_hidden: int = 14336  # SwiGLU width, of the dense MLPs and of every expert
    # the layer pattern: layer i is attention iff i % attn_every == attn_offset,
    # and its feed-forward part a mixture of experts iff i % moe_every == moe_offset
    attn_every: int = 8
    attn_offset: int = 4
    moe_every: int = 2
    moe_offset: int = 1
    n_experts: int = 16  # 0: every feed-forward part is a dense SwiGLU
    n_experts_per_tok: int = 2
    moe_aux_weight: float = 0.001  # weight of the load-balancing loss (Jamba's router_aux_loss_coef)
    moe_z_weight: float = 0.0
    # the Mamba layers (layers/ssm.py)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None = ceil(n_embd / 16)
    conv_bias: bool = True
    ssm_bias: bool = False  # biases of the Mamba in_proj / out_proj
    scan: Literal["chunked", "sequential"] = "chunked"
    scan_chunk: int = 8
    scan_segment: int = 32
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dropout: float = 0.0  # attention dropout
    attn_backend: Literal["sdpa", "reference"] = "sdpa"
    init_std: float = 0.02
    dt_min: float = 0.001
    dt_max: float = 0.1

    def validate(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "mlp_hidden", "attn_every",
                              "moe_every", "d_state", "d_conv", "expand", "scan_chunk", "scan_segment")
        self.check_heads()
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.attn_offset < self.attn_every:
            raise ConfigError(f"attn_offset must be in 0..{self.attn_every - 1}, got {self.attn_offset}")
        if not 0 <= self.moe_offset < self.moe_every:
            raise ConfigError(f"moe_offset must be in 0..{self.moe_every - 1}, got {self.moe_offset}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts):
            raise ConfigError(
                f"need n_experts >= 0 and 1 <= n_experts_per_tok <= n_experts, got {self.n_experts}, "
                f"{self.n_experts_per_tok}"
            )
        self.require_positive("dt_rank", optional=True)
        if self.scan_segment % self.scan_chunk:
            raise ConfigError("scan_segment must be a multiple of scan_chunk")
        self.check_dropout()
        if self.norm_eps <= 0 or self.init_std <= 0 or not 0 < self.dt_min <= self.dt_max:
            raise ConfigError("norm_eps and init_std must be positive, and 0 < dt_min <= dt_max")

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_every == self.attn_offset

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_offset

    def slot(self, layer: int) -> int:
        """A layer's index among the layers of its kind: its slot in the KV cache or the SSM state."""
        return sum(self.is_attention(i) == self.is_attention(layer) for i in range(layer))

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd


# Jamba v0.1 (the released ai21labs/Jamba-v0.1): 51,570,323,328 parameters, 12,110,311,296 active.
_TINY = dict(n_head=4, n_kv_head=2, attn_every=4, attn_offset=2, n_experts=4, n_experts_per_tok=2, d_state=8)
PRESETS: dict[str, dict] = {
    "jamba-v0.1": dict(),
    # on CPU next to gpt2-char-cpu (4 x 128): 988,872 active parameters (its: 801,664); one attention layer in 4,
    # MoE (4 experts, top 2) in every other layer
    "jamba-char-cpu": dict(n_layer=4, n_embd=128, mlp_hidden=256, block_size=64, vocab_size=65, **_TINY),
    # four layers covering every combination: mamba+MoE, attention+MLP, mamba+MLP, attention+MoE
    "jamba-debug": dict(
        n_layer=4, n_embd=32, mlp_hidden=48, block_size=32, vocab_size=97, **{**_TINY, "attn_every": 2,
        "attn_offset": 1, "moe_every": 3, "moe_offset": 0}, scan_chunk=4, scan_segment=8,
    ),
}


class JambaBlock(Block):
    """Pre-norm residual block: RMSNorm -> (attention or Mamba), RMSNorm -> (SwiGLU or MoE of SwiGLUs)."""

    def __init__(self, cfg: JambaConfig, layer: int):
        super().__init__()
        self.attention = cfg.is_attention(layer)
        self.slot = cfg.slot(layer)  # its index in cache.kv (attention) or cache.ssm (Mamba)
        self.mixer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if self.attention:  # no RoPE: Jamba's attention layers take no position information
            self.mixer = CausalSelfAttention(
                cfg.n_embd, cfg.n_head, cfg.n_kv_head, bias=False, dropout=cfg.dropout,
                backend=cfg.attn_backend,
            )
        else:
            self.mixer = SelectiveSSM(
                cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, cfg.conv_bias, cfg.ssm_bias,
                inner_norms=True, norm_eps=cfg.norm_eps, scan=cfg.scan, chunk=cfg.scan_chunk,
                segment=cfg.scan_segment,
            )
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if cfg.is_moe(layer):
            self.ffn = MoE(cfg.n_embd, cfg.mlp_hidden, cfg.n_experts, cfg.n_experts_per_tok, "swiglu",
                           renormalize=False)
        else:
            self.ffn = SwiGLU(cfg.n_embd, cfg.mlp_hidden, bias=False)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int):
        """x (B, T, C) -> (B, T, C), and the router's statistics in an MoE block."""
        h, cache = self.mixer_norm(x), ctx.cache
        if self.attention:
            mask, is_causal = ctx.mask()
            h = self.mixer(h, None, mask, is_causal, cache.kv if cache is not None else None, self.slot)
        else:
            h = self.mixer(h, cache.ssm if cache is not None else None, self.slot)
        return self.feed_forward(x + h)


class Jamba(LanguageModel):
    family = "jamba"
    config_class = JambaConfig
    legacy_names = renamed(("wte", "embed"), ("norm_f", "norm"), ("lm_head", "head"))

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = Blocks(JambaBlock(cfg, i) for i in range(cfg.n_layer))
        self.n_attention = sum(cfg.is_attention(i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.make_head(cfg.vocab_size, cfg.tie_embeddings)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialization (transformers' Jamba init, with Mamba's own for the SSM parameters).

        | weight                                                    | init                              |
        |-----------------------------------------------------------|-----------------------------------|
        | embedding, head, q/k/v, gate/up, router, in/x_proj        | normal(0, init_std=0.02)          |
        | residual projections (mixer.proj, down, Mamba out_proj)   | normal(0, 0.02 / sqrt(2*n_layer)) |
        | conv1d                                                    | PyTorch's default; bias 0         |
        | dt_proj, A_log, D (Mamba layers)                          | Mamba's (layers/ssm.py)           |
        | RMSNorm weights                                           | 1                                 |
        """
        cfg = self.config
        self.init_normal(cfg.init_std)
        self.init_residual(cfg.init_std, ("mixer.proj.weight", "down.weight", "out_proj.weight"))
        for m in self.modules():
            if isinstance(m, SelectiveSSM):
                m.conv1d.reset_parameters()
                if m.conv1d.bias is not None:
                    nn.init.zeros_(m.conv1d.bias)
                m.reset_ssm_parameters(cfg.dt_min, cfg.dt_max)

    def begin(self, idx: torch.Tensor, cache: DecodingState | None) -> tuple[torch.Tensor, Context]:
        """The token embedding and the attention layers' mask (no positions anywhere: the Mamba
        layers tell the attention layers the order)."""
        x = self.embed_tokens(idx)  # (B, T, C)
        return x, Context(cache, None, {None: cache.mask(idx.shape[1]) if cache is not None else (None, True)})

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> HybridCache:
        """KV slots for the attention layers (``max_len``, default block_size) and SSM state for the rest
        (a recurrence: it cannot roll back)."""
        cfg = self.config
        kw = dict(dtype=dtype or self.dtype, device=device or self.device, pad=pad)
        head_dim = cfg.n_embd // cfg.n_head
        kv = KVCache(self.n_attention, batch, cfg.n_kv_head, head_dim, max_len or cfg.block_size, **kw)
        ssm = MambaCache(cfg.n_layer - self.n_attention, batch, cfg.d_inner, cfg.d_conv, cfg.d_state, **kw)
        return HybridCache(kv, ssm)

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """Training FLOPs per token: 6 * N_active (the experts a token runs) + attention + the scans.

        Attention: 12 * d * T per attention layer (PaLM appendix B); the scan: 24 * d_inner * d_state
        per Mamba layer (see :meth:`lmzoo.models.mamba.Mamba.flops_per_token`).
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n_mamba = cfg.n_layer - self.n_attention
        attention = attention_flops(cfg.n_embd, [T] * self.n_attention)
        return 6 * self.active_params() + attention + 24 * n_mamba * cfg.d_inner * cfg.d_state
