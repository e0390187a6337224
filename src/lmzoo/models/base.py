"""The contract every lmzoo model family keeps, in code (docs/ARCHITECTURE.md).

A family is a :class:`LanguageModel` with these parts, named the same in every family:

    embed            token embedding (B, T) -> (B, T, C)
    blocks           the residual blocks, a :class:`Blocks` keyed by layer index
      .mixer_norm    norm before (pre-norm) or after (post-norm) the sequence mixer
      .mixer         the sequence mixer: attention of any kind, a selective SSM, ...
      .ffn_norm      norm of the feed-forward branch (None: the block has none)
      .ffn           the feed-forward part: MLP, SwiGLU, mixture of experts, KAN (None: none)
    norm             final norm (None: a post-norm model has none, or a pipeline stage without it)
    head             output projection (B, T, C) -> (B, T, vocab)

Everything applied from outside (LoRA, NF4, BitNet, multi-token heads, activation checkpointing,
precision, tensor and pipeline parallelism) finds what it needs through these names; nothing needs
``inspect``, ``hasattr`` or a table of family names.

A family writes two things: its blocks (``Block.forward(x, ctx, layer) -> (x, router stats or
None)``, the same call in every family) and :meth:`LanguageModel.begin`, the input end of its
forward: the embedding, the positions, and a :class:`Context` every block of the chunk shares
(rotary tables, masks, the decoding state). The rest of the forward (the loop over the blocks,
the final norm, the head, the loss, the router losses, ``last_only``) is written once here.

A pipeline stage is the model itself with the parts it does not hold set to ``None``
(:mod:`lmzoo.distributed.pipeline`): ``begin`` then receives hidden states instead of token ids,
and ``forward`` returns hidden states where the head is absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.cache import DecodingState
from lmzoo.config import Config
from lmzoo.errors import ConfigError
from lmzoo.layers.chunked_ce import linear_cross_entropy
from lmzoo.layers.moe import MoE, add_router_losses, combine_router_stats

PARTS = ("mixer", "ffn")  # the parts of a block that transforms (LoRA, NF4, BitNet) reach


class LMOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab), (B, 1, vocab) with last_only; hidden states at a stage without head
    loss: torch.Tensor | None = None  # the training objective: cross-entropy (+ weighted auxiliary terms)
    aux: dict[str, torch.Tensor] | None = None  # auxiliary terms reported separately (e.g. MoE balance)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; targets of -1 are ignored (padding, prompts)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


@dataclasses.dataclass
class Context:
    """What the blocks of one forward chunk share, computed once by :meth:`LanguageModel.begin`.

    ``masks`` maps an attention window (None: full causal) to ``(mask, is_causal)`` as
    :meth:`lmzoo.cache.KVCache.mask` returns it; ``shared`` holds values a layer writes for later
    layers of the same chunk (cross-layer KV sharing), keyed so that a recomputed block
    (activation checkpointing) reads what its forward read.
    """

    cache: DecodingState | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of the chunk's positions
    masks: dict[int | None, tuple[torch.Tensor | None, bool]] = dataclasses.field(default_factory=dict)
    shared: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def mask(self, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        return self.masks.get(window, (None, True))


class Blocks(nn.ModuleDict):
    """The residual blocks, keyed by layer index: ``blocks.3.mixer...`` in the state dict, as an
    ``nn.ModuleList`` names them. A pipeline stage holds some of them (``distributed/pipeline.py``,
    ``stage_of``); each block keeps its own index, so a stage's names are the whole model's."""

    def __init__(self, blocks=()):
        super().__init__({str(i): b for i, b in enumerate(blocks)})

    def __getitem__(self, i: int | str) -> nn.Module:
        if isinstance(i, int) and i < 0:
            i = list(self.keys())[i]
        return super().__getitem__(str(i))

    def __setitem__(self, i: int | str, module: nn.Module) -> None:
        super().__setitem__(str(i), module)

    def __iter__(self) -> Iterator[nn.Module]:  # the blocks, like a ModuleList (ModuleDict yields keys)
        return iter(self.values())

    def indexed(self) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, block) in order."""
        return ((int(k), b) for k, b in self.items())


class Block(nn.Module):
    """The base of every family's residual block: its canonical parts and its call.

    A family's block sets ``mixer_norm``, ``mixer``, ``ffn_norm`` and ``ffn`` (the last two None
    when it has no feed-forward part) and writes ``forward(x, ctx, layer) -> (x, stats)``: x
    (B, T, C) in and out, ``ctx`` the chunk's :class:`Context`, ``layer`` its index in the model
    (its slot in the decoding state), ``stats`` the router's statistics in a mixture-of-experts
    block (:class:`lmzoo.layers.moe.RouterStats`), else None.
    """

    mixer_norm: nn.Module | None
    mixer: nn.Module
    ffn_norm: nn.Module | None
    ffn: nn.Module | None

    def forward(self, x: torch.Tensor, ctx: Context, layer: int) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def feed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The pre-norm feed-forward branch, ``x + ffn(ffn_norm(x))``, and the router's statistics when
        the ffn is a mixture of experts (else None)."""
        if isinstance(self.ffn, MoE):
            h, stats = self.ffn(self.ffn_norm(x))
            return x + h, stats
        return x + self.ffn(self.ffn_norm(x)), None


class ModelConfig(Config):
    """The base of the families' configs: the checks they share (each family's ``validate`` calls
    the ones that apply to it, then its own)."""

    def require_positive(self, *names: str, optional: bool = False) -> None:
        """Each named field is > 0; ``optional``: or None (a size the family derives when not given)."""
        for name in names:
            value = getattr(self, name)
            if not (optional and value is None) and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")

    def check_heads(self) -> None:
        """``n_kv_head`` (None: multi-head) divides ``n_head`` (grouped-query attention)."""
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not 0 < self.n_kv_head <= self.n_head or self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def check_dropout(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def check_experts(self) -> None:
        """0 experts (dense) or at least 2, with 1 <= n_experts_per_tok <= n_experts."""
        if self.n_experts < 0 or self.n_experts == 1:
            raise ConfigError(f"n_experts must be 0 (dense) or at least 2, got {self.n_experts}")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ConfigError(f"n_experts_per_tok must be in 1..{self.n_experts}, got {self.n_experts_per_tok}")


class LanguageModel(nn.Module):
    """The base of every model family (see the module docstring for the parts and the forward).

    A family sets ``family`` (its registry name), ``config_class``, builds ``embed``, ``blocks``,
    ``norm`` and ``head``, and implements :meth:`begin`, :meth:`init_cache` and
    :meth:`flops_per_token`; ``max_positions`` is None unless a position table bounds the context.
    """

    family: str = ""
    config_class: type[Config]
    config: Config
    # parts that belong to the input end (a pipeline stage other than the first drops them)
    input_parts: tuple[str, ...] = ("embed",)
    # state-dict names written by earlier versions: (regex, replacement) applied in order by upgrade_name
    legacy_names: tuple[tuple[str, str], ...] = ()
    ce_chunk: int = 0  # > 0: the training loss runs the head ce_chunk tokens at a time (chunked_ce.py)
    static_decoding: bool = True  # decodes from a StaticKVCache (positions from its bound; not ALiBi)

    embed: nn.Module | None
    blocks: Blocks
    norm: nn.Module | None
    head: nn.Module | None

    # -- the forward ---------------------------------------------------------------------------
    def begin(self, idx: torch.Tensor, cache: DecodingState | None) -> tuple[torch.Tensor, Context]:
        """The input end: ``idx`` (B, T) token ids -> hidden states (B, T, C) and the chunk's
        :class:`Context`. A pipeline stage after the first receives hidden states (floating point)
        in place of ids and passes them on (see :meth:`embed_tokens`)."""
        raise NotImplementedError

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """The token embedding of ids; hidden states (a later pipeline stage's input) unchanged."""
        return idx if idx.is_floating_point() else self.embed(idx)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: DecodingState | None = None,
                last_only: bool = False) -> LMOutput:
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the loss.

        With a ``cache``, idx holds the next T tokens after those already cached. In a
        mixture-of-experts model ``aux`` holds the router's losses and statistics, and the loss adds
        ``moe_aux_weight * moe_balance + moe_z_weight * moe_z`` to the cross-entropy, which
        ``aux["lm_loss"]`` reports alone (what the trainer's validation reads).
        """
        x, ctx = self.begin(idx, cache)
        stats = []
        for layer, block in self.blocks.indexed():
            x, s = block(x, ctx, layer)
            if s is not None:
                stats.append(s)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.finish(x, targets, stats, last_only)

    def finish(self, x: torch.Tensor, targets: torch.Tensor | None, stats: list, last_only: bool = False) -> LMOutput:
        """The shared tail: final norm, head, loss and router losses (x: the last block's output)."""
        aux = combine_router_stats(stats) if stats else None  # MoE: router losses and expert loads
        if self.head is None:  # a pipeline stage before the last: hidden states go on
            return LMOutput(x, None, aux)
        if self.norm is not None:
            x = self.norm(x)
        if targets is None:
            return LMOutput(self.logits(x[:, -1:] if last_only else x), None, aux)
        if self.ce_chunk:  # head + loss chunk by chunk: no (B, T, vocab) float32 logits (logits None)
            logits = None
            loss = linear_cross_entropy(x, self.head.weight, targets, self.ce_chunk, self.config.vocab_size)
        else:
            logits = self.logits(x)
            loss = lm_loss(logits, targets)
        if aux is not None:
            aux["lm_loss"] = loss.detach()
            loss = add_router_losses(loss, aux, self.config.moe_aux_weight, self.config.moe_z_weight)
        return LMOutput(logits, loss, aux)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) after the final norm -> (B, T, vocab_size): a padded vocabulary's extra rows dropped."""
        logits = self.head(x)
        V = self.config.vocab_size
        return logits[..., :V] if logits.shape[-1] != V else logits

    # -- decoding, positions, FLOPs ------------------------------------------------------------
    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = False
    ) -> DecodingState:
        """Decoding state for ``batch`` rows of up to ``max_len`` tokens (default: the trained context).

        ``pad`` (B,): left-padding counts, so that each row computes what it would alone.
        ``rollback``: a state that can forget its newest tokens (parallel decoders); a family whose
        state cannot (a recurrence, a ring buffer only) returns one whose ``can_rollback`` is False.
        """
        raise NotImplementedError

    def max_positions(self) -> int | None:
        """The longest sequence the position encoding allows (None: unbounded)."""
        return None

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len`` (default: the trained
        context); ``recurrent``: the forward carries a decoding state from chunk to chunk (a
        Transformer-XL memory then adds its keys)."""
        raise NotImplementedError

    # -- parts and transforms ------------------------------------------------------------------
    def block_modules(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, block) of every residual block, in order: what transforms walk
        (a wrapper adds its own, e.g. multi-token heads' blocks)."""
        return [(f"blocks.{layer}", block) for layer, block in self.blocks.indexed()]

    def part_linears(self, parts: tuple[str, ...] = PARTS) -> list[str]:
        """Qualified names of the ``nn.Linear`` layers inside the blocks' ``parts`` (transforms' targets)."""
        out = []
        for prefix, block in self.block_modules():
            for part in parts:
                module = getattr(block, part, None)
                if module is not None:
                    out += [".".join(filter(None, (prefix, part, n)))
                            for n, m in module.named_modules() if type(m) is nn.Linear]
        return out

    def make_head(self, rows: int, tie: bool) -> None:
        """The output projection ``head`` (C -> ``rows`` logits, no bias); with ``tie``, weight tying
        (Press & Wolf 2017): the head shares the embedding matrix."""
        self.head = nn.Linear(self.embed.embedding_dim, rows, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    @classmethod
    def upgrade_name(cls, name: str) -> str:
        """A parameter or module name as this version calls it (names from older checkpoints renamed)."""
        for old, new in cls.legacy_names:
            name = re.sub(old, new, name)
        return name

    # -- initialization helpers ----------------------------------------------------------------
    @torch.no_grad()
    def init_normal(self, std: float) -> None:
        """Every ``nn.Linear`` and ``nn.Embedding`` weight from normal(0, std); their biases 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_residual(self, std: float, suffixes: tuple[str, ...]) -> None:
        """The projections into the residual stream (names ending in ``suffixes``) from normal(0, std /
        sqrt(2 n_layer)): each block adds two branches, so 2 n_layer terms are summed and the stream's
        variance stays bounded with depth (GPT-2's scaled initialization)."""
        scaled = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(suffixes):
                nn.init.normal_(p, mean=0.0, std=scaled)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout) for the ``with`` block, then back to the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    # -- size ----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights are counted once. ``non_embedding`` drops position tables.
        Weights a quantized layer keeps packed in buffers (modules with ``packed_params()``: NF4,
        packed BitNet) count as the parameters they stand for."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and name.endswith("pos_embed.weight"):
                continue
            n += p.numel()
        return n + sum(m.packed_params() for m in self.modules() if hasattr(m, "packed_params"))

    def active_params(self) -> int:
        """Parameters one token computes with: ``num_params(non_embedding=True)`` minus, in mixture-of-
        experts layers (modules with ``inactive_params()``), the experts a token skips. For FLOPs."""
        skipped = sum(
            m.inactive_params() for m in self.modules() if m is not self and hasattr(m, "inactive_params")
        )
        return self.num_params(non_embedding=True) - skipped

    def weight_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the weights take (in ``dtype`` if given, else as stored): every parameter once, and the
        buffers of quantized layers (modules with ``packed_params()``), which hold their weights."""
        if dtype is not None:
            return self.num_params() * torch.empty((), dtype=dtype).element_size()
        seen, n = set(), 0
        for m in self.modules():
            packed = m.buffers(recurse=False) if hasattr(m, "packed_params") else ()
            for t in (*m.parameters(recurse=False), *packed):
                if id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel() * t.element_size()
        return n

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def renamed(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """:attr:`LanguageModel.legacy_names` renaming whole dotted components (``attn`` -> ``mixer``, not
    ``attn_norm``), wherever they stand in a name (inside a wrapper's prefix too)."""
    return tuple((rf"(?<![\w]){re.escape(old)}(?![\w])", new) for old, new in pairs)


def attention_flops(d: int, contexts: list[int]) -> float:
    """Attention's training FLOPs per token beyond the weights (PaLM appendix B): 12 * d * T per
    layer, T the context a query of that layer attends to (d = n_head * head_dim)."""
    return float(sum(12 * d * T for T in contexts))
