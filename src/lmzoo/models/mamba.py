"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Read top to bottom: config and presets, then the block, then the model. The layer that makes
Mamba Mamba, the selective state-space model, is in :mod:`lmzoo.layers.ssm` (docs/mamba.md).

A Mamba language model is a stack of identical pre-norm residual blocks, each a single mixer
(no separate MLP: the mixer's gated expansion plays that role, so a Mamba block has about the
parameters of half a Transformer block and the papers' models use twice the layers):

    x = wte[idx]                                  no positions: the recurrence knows the order
    for each block:  x = x + mixer(rmsnorm(x))    in_proj -> conv1d -> SiLU -> selective SSM, gated
    logits = rmsnorm(x) @ wte^T                   the head shares the embedding (as the checkpoints)

Training cost is linear in the sequence length (a scan, not attention), and decoding keeps a
fixed-size state per layer (:class:`~lmzoo.cache.MambaCache`): the cost of a new token does not
grow with the text before it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from lmzoo.cache import DecodingState, MambaCache
from lmzoo.errors import ConfigError
from lmzoo.layers.norm import RMSNorm
from lmzoo.layers.ssm import SelectiveSSM
from lmzoo.models.base import Block, Blocks, Context, LanguageModel, ModelConfig, renamed


@dataclasses.dataclass
class MambaConfig(ModelConfig):
    vocab_size: int = 50280  # GPT-NeoX's 50277 tokens padded to a multiple of 8, as in the checkpoints
    block_size: int = 2048  # context trained on; the model itself has no limit
    n_layer: int = 24
    n_embd: int = 768  # d_model
    d_state: int = 16  # N: state size per channel
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * n_embd
    dt_rank: int | None = None  # rank of the Δ projection; None = ceil(n_embd / 16)
    conv_bias: bool = True
    bias: bool = False  # biases of in_proj / out_proj
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    scan: Literal["chunked", "sequential"] = "chunked"  # the training scan (layers/ssm.py)
    scan_chunk: int = 8  # tokens scanned one by one inside a chunk, all chunks at once
    scan_segment: int = 32  # tokens per recomputed segment: bounds the scan's working memory
    init_std: float = 0.02  # the embedding's init
    dt_min: float = 0.001  # initial time scales Δ are log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1

    def validate(self) -> None:
        self.require_positive("vocab_size", "block_size", "n_layer", "n_embd", "d_state", "d_conv", "expand",
                              "scan_chunk", "scan_segment")
        self.require_positive("dt_rank", optional=True)
        if self.scan_segment % self.scan_chunk:
            raise ConfigError(
                f"scan_segment ({self.scan_segment}) must be a multiple of scan_chunk ({self.scan_chunk})"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps and init_std must be positive")

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd


# The paper's Table 12 sizes (the released state-spaces/mamba-* checkpoints); counts with the
# tied embedding counted once: 130m = 129,135,360 parameters.
PRESETS: dict[str, dict] = {
    "mamba-130m": dict(n_layer=24, n_embd=768),
    "mamba-370m": dict(n_layer=48, n_embd=1024),
    "mamba-790m": dict(n_layer=48, n_embd=1536),
    "mamba-1.4b": dict(n_layer=48, n_embd=2048),
    "mamba-2.8b": dict(n_layer=64, n_embd=2560),
    # about gpt2-char-cpu's parameters: twice its layers, since a Mamba block is half a Transformer block
    "mamba-char-cpu": dict(n_layer=8, n_embd=128, block_size=64, vocab_size=65),
    "mamba-debug": dict(
        n_layer=2, n_embd=32, d_state=8, block_size=32, vocab_size=97, scan_chunk=4, scan_segment=8
    ),
}


class MambaBlock(Block):
    """Pre-norm residual block around one selective-SSM mixer (no feed-forward part)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mixer = SelectiveSSM(
            cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, cfg.conv_bias, cfg.bias,
            scan=cfg.scan, chunk=cfg.scan_chunk, segment=cfg.scan_segment,
        )
        self.ffn_norm = self.ffn = None  # the mixer's gated expansion plays the feed-forward's role

    def forward(self, x: torch.Tensor, ctx: Context, layer: int):
        """x (B, T, C) -> (B, T, C); no router."""
        return x + self.mixer(self.mixer_norm(x), ctx.cache, layer), None


class Mamba(LanguageModel):
    family = "mamba"
    config_class = MambaConfig
    # the block's norm was `norm` and the final one `norm_f` (renamed in this order)
    legacy_names = ((r"(?<![\w])(blocks\.\d+)\.norm(?![\w])", r"\1.mixer_norm"),
                    *renamed(("wte", "embed"), ("norm_f", "norm"), ("lm_head", "head")))

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = Blocks(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.make_head(cfg.vocab_size, cfg.tie_embeddings)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Mamba's initialization (mamba_ssm's ``_init_weights`` and ``Mamba.__init__``).

        | weight                                  | init                                        |
        |-----------------------------------------|---------------------------------------------|
        | embedding (and the tied head)           | normal(0, init_std=0.02)                    |
        | in_proj, x_proj, conv1d                 | PyTorch's default (Kaiming uniform)         |
        | out_proj                                | Kaiming uniform / sqrt(n_layer)             |
        | dt_proj.weight                          | uniform(±dt_rank^-0.5)                      |
        | dt_proj.bias                            | softplus^-1(Δ0), Δ0 log-uniform [dt_min, dt_max] |
        | A_log, D                                | log(1..N) (A = -1..-N, S4D-real), 1         |
        | other biases; norm weights              | 0; 1                                        |

        Dividing out_proj by sqrt(n_layer) keeps the residual stream's variance from growing
        with depth (GPT-2's scheme, one residual branch per block).
        """
        cfg = self.config
        nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, mean=0.0, std=cfg.init_std)
        for block in self.blocks:
            mixer = block.mixer
            for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj, mixer.conv1d):
                lin.reset_parameters()
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            mixer.out_proj.weight.div_(math.sqrt(cfg.n_layer))
            mixer.reset_ssm_parameters(cfg.dt_min, cfg.dt_max)

    def begin(self, idx: torch.Tensor, cache: DecodingState | None) -> tuple[torch.Tensor, Context]:
        """The token embedding; the mixers take the state straight from the cache (any chunk length:
        a chunked prefill runs the parallel scan from the cached state, one token the recurrent step)."""
        return self.embed_tokens(idx), Context(cache)

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> MambaCache:
        """The recurrent state for ``batch`` rows; ``max_len`` is accepted and unused (no history is
        kept, so nothing can be rolled back)."""
        cfg = self.config
        return MambaCache(
            cfg.n_layer, batch, cfg.d_inner, cfg.d_conv, cfg.d_state,
            dtype=dtype or self.dtype, device=device or self.device, pad=pad,
        )

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """Training FLOPs per token: 6 per parameter (matmuls, 2 forward + 4 backward) plus the scan.

        The scan's elementwise work per token and layer is about 8 * d_inner * d_state forward
        (discretize Ā and B̄x, update the state, read out C·h), times 3 with the backward. It does
        not depend on ``seq_len``: a token's cost is the same at any context.
        """
        cfg = self.config
        return 6 * self.num_params() + 24 * cfg.n_layer * cfg.d_inner * cfg.d_state
