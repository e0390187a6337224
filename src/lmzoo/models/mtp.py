"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction").

A shared trunk f_s feeds n independent output heads f_h1..f_hn (each one Transformer layer) and
a shared unembedding f_u; head i predicts token t + i from the tokens up to t:

    P(x_{t+i} | x_{<=t}) = softmax(f_u(f_hi(f_s(x_{<=t})))),     L_n = - sum_t sum_{i=1..n} log P(x_{t+i} | x_{<=t}).

Any lmzoo Transformer becomes one without a change to its file: :class:`MultiTokenLM` takes the
model's first L - 1 blocks as the trunk and its last block (+ final norm + head) as head 1, the
next-token head, so ``n_future=1`` *is* the ordinary model. Heads 2..n are copies of the last
block and of the final norm (independent parameters, same initial values); the unembedding
(``lm_head``) is shared by all heads, as in the paper.

Memory-efficient backward (the paper's section 2): the n heads' logits (B, T, V) each would make
peak memory n times that of the ordinary model. Instead the trunk output h is detached, and each
head in turn runs forward and backward, accumulating dL/dh and its own parameter gradients before
the next head starts; then one backward pass through the trunk with the summed dL/dh. Here this
runs inside an ``autograd.Function`` (:class:`_SequentialHeads`): its forward does the per-head
passes and keeps the gradients, its backward multiplies them by the incoming gradient (the
trainer's 1/grad_accum and loss scale) and hands dL/dh on to the trunk, so the shared trainer's
``loss.backward()`` works unchanged.

Self-speculative decoding (Stern et al. 2018 blockwise parallel decoding, as in the paper's
section 3.2): head 1 gives the next token, heads 2..n draft the n - 1 after it; one forward pass over
those n tokens verifies the drafts with head 1 and keeps the longest prefix that matches its
greedy choices (plus head 1's next token), and the same pass already gives the next drafts.
Greedy output is identical to ordinary greedy decoding.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from lmzoo.cache import DecodingState, KVCache
from lmzoo.decoding.common import (
    DecodeStats,
    leading_true,
    prepare_decoding,
    rollback_cache,
)
from lmzoo.errors import ConfigError
from lmzoo.layers.moe import MoE
from lmzoo.models.base import Context, LanguageModel, LMOutput, lm_loss


def _check_base(base: LanguageModel) -> None:
    """Refuse, before any training, a model whose checkpoint could not decode with extra heads: the
    heads run copies of the last block, each with a one-layer KV cache that rolls back, so the model
    needs a full KV cache (Mamba's state, Transformer-XL's memory, linear or Infini-attention's
    recurrent state cannot roll back), a last block with its own keys and values, and dense
    feed-forward parts (the heads' losses carry no router losses). One line naming the family."""
    why = None
    if any(isinstance(block.ffn, MoE) for block in base.blocks):
        why = "its ffn is a mixture of experts (the extra heads would need their own router losses)"
    elif getattr(base.config, "kv_share_every", 1) != 1:
        why = (f"its layers share keys/values (kv_share_every={base.config.kv_share_every}): a copy of the last "
               "block alone would lack its group's keys and values")
    else:
        try:
            rollback_cache(base, 1, 1)  # a one-token cache: tiny
        except ConfigError as e:
            why = f"its mixer keeps no full KV cache that could roll back ({e})"
    if why is None and (len(base.blocks) < 2 or base.norm is None or base.head is None):
        why = f"it needs >= 2 blocks, a final norm and a head (the model has {len(base.blocks)} block(s))"
    if why is not None:
        raise ConfigError(f"multi-token prediction cannot wrap the {base.family} model: {why}")


class MTPCache(DecodingState):
    """Decoding state of a :class:`MultiTokenLM`: the base model's cache (trunk and head 1) and a
    one-layer cache per extra head, all at one position: they advance and roll back together."""

    can_rollback = True

    def __init__(self, trunk: KVCache, heads: list[KVCache]):
        self.trunk, self.heads = trunk, heads
        super().__init__(trunk.batch, trunk.device, trunk.pad)

    @property
    def pos(self) -> int:
        return self.trunk.pos

    @pos.setter
    def pos(self, value: int) -> None:
        for c in (self.trunk, *self.heads):
            c.pos = value

    def tensors(self) -> list[torch.Tensor]:
        return [t for c in (self.trunk, *self.heads) for t in c.tensors()]


class MTPHead(nn.Module):
    """An extra output head: one Transformer block and a final norm (the unembedding is shared)."""

    def __init__(self, block: nn.Module, norm: nn.Module):
        super().__init__()
        self.block, self.norm = block, norm


class MultiTokenLM(LanguageModel):
    """``base`` with ``n_future`` output heads (see the module docstring).

    ``forward(idx, targets=None, cache=None, last_only=False) -> LMOutput``: logits are head 1's
    (B, T, V); with targets (B, T) (targets[t] = idx[t + 1]) the loss is the sum over heads of the
    mean cross-entropy of head i against the token i - 1 places further (``aux``: each head's
    loss, ``lm_loss`` = head 1's, comparable with an ordinary model's loss).
    ``memory_efficient``: the sequential per-head backward (identical gradients, less memory).
    """

    def __init__(self, base: LanguageModel, n_future: int = 4, memory_efficient: bool = True):
        super().__init__()
        if n_future < 1:
            raise ConfigError(f"n_future must be >= 1, got {n_future}")
        _check_base(base)
        self.base, self.n_future, self.memory_efficient = base, n_future, memory_efficient
        self.family, self.config = base.family, base.config
        self.heads = nn.ModuleList(
            MTPHead(copy.deepcopy(base.blocks[-1]), copy.deepcopy(base.norm)) for _ in range(n_future - 1)
        )

    def upgrade_name(self, name: str) -> str:
        return self.base.upgrade_name(name)

    def block_modules(self) -> list[tuple[str, nn.Module]]:
        """The base model's blocks, then each extra head's block."""
        return ([(f"base.{n}", b) for n, b in self.base.block_modules()]
                + [(f"heads.{i}.block", h.block) for i, h in enumerate(self.heads)])

    # -- pieces --------------------------------------------------------------------------------
    def head_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        """(block, norm) of head i (0-based: 0 is the next-token head, the base model's own)."""
        if i == 0:
            return self.base.blocks[-1], self.base.norm
        return self.heads[i - 1].block, self.heads[i - 1].norm

    def trunk(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, Context]:
        """The base model up to its last block: (h (B, T, C), the chunk's context for the heads)."""
        x, ctx = self.base.begin(idx, cache)
        *shared, _ = self.base.blocks.indexed()
        for layer, block in shared:
            x, _ = block(x, ctx, layer)
        return x, ctx

    def run_head(self, i: int, h: torch.Tensor, ctx: Context, cache: MTPCache | None = None) -> torch.Tensor:
        """Head i on the trunk output h (B, T, C) -> logits (B, T, V) (writes the head's cache, if any)."""
        return self.base.logits(self.head_hidden(i, h, ctx, cache))

    def head_hidden(self, i: int, h: torch.Tensor, ctx: Context, cache: MTPCache | None = None) -> torch.Tensor:
        """Head i's block and norm on the trunk output h (B, T, C) -> (B, T, C), before the unembedding."""
        block, norm = self.head_modules(i)
        last = len(self.base.blocks) - 1
        if cache is None:
            c, layer = None, (last if i == 0 else 0)
        elif i == 0:
            c, layer = cache.trunk, last
        else:
            c, layer = cache.heads[i - 1], 0  # an extra head's block is layer 0 of its own cache
        y, _ = block(h, dataclasses.replace(ctx, cache=c), layer)
        return norm(y)

    def head_logits(self, idx: torch.Tensor, cache: MTPCache | None = None) -> list[torch.Tensor]:
        """Every head's logits: a list of n tensors (B, T, V); head i predicts the token i places ahead."""
        h, ctx = self.trunk(idx, cache.trunk if cache is not None else None)
        out = [self.run_head(i, h, ctx, cache) for i in range(self.n_future)]
        if cache is not None:
            cache.advance(idx.shape[1])
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters the heads use (last block, norms, extra heads, shared unembedding), once each."""
        mods = [m for i in range(self.n_future) for m in self.head_modules(i)] + [self.base.head]
        seen, out = set(), []
        for m in mods:
            for p in m.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
        return out

    # -- the LanguageModel contract ----------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: MTPCache | None = None,
                last_only: bool = False) -> LMOutput:
        if targets is None:
            if cache is None:  # only head 1 is needed: the base model's own forward
                return self.base(idx, last_only=last_only)
            # every head's block runs, so that each head's cache holds every position; only head 1 is unembedded
            h, ctx = self.trunk(idx, cache.trunk)
            y = [self.head_hidden(i, h, ctx, cache) for i in range(self.n_future)][0]
            cache.advance(idx.shape[1])
            return LMOutput(self.base.logits(y[:, -1:] if last_only else y))
        h, ctx = self.trunk(idx, cache.trunk if cache is not None else None)
        # head i (0-based) predicts idx[t + i + 1] = targets[t + i]; the last i positions have no target
        shifted = [torch.nn.functional.pad(targets[:, i:], (0, i), value=-1) for i in range(self.n_future)]
        if self.memory_efficient and torch.is_grad_enabled() and cache is None:
            total, losses, logits = _SequentialHeads.apply(h, self, ctx, shifted, *self.head_parameters())
        else:
            all_logits = [self.run_head(i, h, ctx, cache) for i in range(self.n_future)]
            losses = torch.stack([lm_loss(lg, t) for lg, t in zip(all_logits, shifted)])
            total, logits = losses.sum(), all_logits[0]
            if cache is not None:
                cache.advance(idx.shape[1])
        aux = {f"mtp_loss_{i + 1}": losses[i].detach() for i in range(self.n_future)}
        aux["lm_loss"] = losses[0].detach()
        return LMOutput(logits, total, aux)

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=None, device=None, pad=None, rollback: bool = True
    ) -> MTPCache:
        """Full-length caches (they must roll back for self-speculative decoding)."""
        trunk = rollback_cache(self.base, batch, max_len or self.config.block_size, pad)
        layer = len(self.base.blocks) - 1
        return MTPCache(trunk, [trunk.one_layer(layer) for _ in range(self.n_future - 1)])

    def max_positions(self) -> int | None:
        return self.base.max_positions()

    def flops_per_token(self, seq_len: int | None = None, recurrent: bool = False) -> float:
        """The base model's, plus each extra head's block and unembedding (6 N) and attention."""
        base = self.base.flops_per_token(seq_len)
        attn_per_layer = (base - 6 * self.base.active_params()) / len(self.base.blocks)
        extra = sum(p.numel() for p in self.heads.parameters()) + self.base.head.weight.numel() * (self.n_future - 1)
        return base + 6 * extra + (self.n_future - 1) * attn_per_layer


class _SequentialHeads(torch.autograd.Function):
    """Sum of the heads' losses with the memory-efficient backward (one head's graph alive at a time).

    forward(h, model, ctx, targets, *params) -> (total loss, per-head losses (n,), head-1 logits);
    the gradients are computed in forward, head by head, and scaled in backward.
    """

    @staticmethod
    def forward(fctx, h, model, ctx, targets, *params):
        grad_h = torch.zeros_like(h)
        grads: list[torch.Tensor | None] = [None] * len(params)
        losses, logits0 = [], None
        with torch.enable_grad():
            hd = h.detach().requires_grad_(True)
            for i in range(model.n_future):
                logits = model.run_head(i, hd, ctx)
                loss = lm_loss(logits, targets[i])
                g = torch.autograd.grad(loss, [hd, *params], allow_unused=True)  # frees this head's graph
                grad_h += g[0]
                for j, gj in enumerate(g[1:]):
                    if gj is not None:
                        grads[j] = gj if grads[j] is None else grads[j] + gj
                losses.append(loss.detach())
                if i == 0:
                    logits0 = logits.detach()
                del logits, loss, g
        fctx.grads = (grad_h, grads)
        losses = torch.stack(losses)
        fctx.mark_non_differentiable(losses, logits0)
        return losses.sum(), losses, logits0

    @staticmethod
    def backward(fctx, g_total, g_losses, g_logits):
        grad_h, grads = fctx.grads
        del fctx.grads
        return (grad_h * g_total, None, None, None, *[None if g is None else g * g_total for g in grads])


@torch.inference_mode()
def self_speculative_generate(
    model: MultiTokenLM, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int
) -> tuple[list[list[int]], DecodeStats]:
    """Greedy decoding that drafts with heads 2..n and verifies with head 1 (identical to greedy).

    Returns (new tokens of each row, :class:`DecodeStats`: ``steps`` verification passes after the
    prefill, ``accepted`` drafts kept per pass; each pass emits accepted + 1 tokens).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids, pad, max_len = prepare_decoding(prompts, max_new_tokens, model)
    B, P = ids.shape
    stats = DecodeStats()
    with model.evaluating():
        cache = model.init_cache(B, max_len, pad=pad)
        heads = model.head_logits(ids, cache)  # the prompt, all of it cached
        nxt = heads[0][:, -1].argmax(-1)  # (B,) head 1: certain (it is greedy decoding's choice)
        drafts = [lg[:, -1].argmax(-1) for lg in heads[1:]]  # heads 2..n: guesses for the tokens after it
        seq = ids
        while seq.shape[1] - P < max_new_tokens:
            left = max_new_tokens - (seq.shape[1] - P)
            block = torch.stack([nxt, *drafts[: left - 1]], 1)  # (B, <= n)
            start = cache.pos
            heads = model.head_logits(block, cache)  # one pass: verify and draft again
            greedy = heads[0].argmax(-1)  # (B, n): greedy choice after each block prefix
            a = int(leading_true(block[:, 1:] == greedy[:, :-1]).min())  # drafts that greedy agrees with
            seq = torch.cat([seq, block[:, : a + 1]], 1)
            cache.rollback(start + a + 1)  # forget the rejected drafts
            nxt = greedy[:, a]
            drafts = [lg[:, a].argmax(-1) for lg in heads[1:]]
            stats.steps += 1
            stats.accepted.append(a)
            stats.proposed += block.shape[1] - 1
        stats.tokens = min(seq.shape[1] - P, max_new_tokens)
    return seq[:, P : P + max_new_tokens].tolist(), stats
