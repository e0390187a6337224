"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe, Huang et al. 2019; 1F1B,
Narayanan et al. 2019): rank r holds a contiguous run of blocks and passes activations on.

::

    rank 0: wte (+ wpe) -> blocks[0:k]     --x-->   rank 1: blocks[k:L] -> ln_f -> lm_head -> loss
                            <--dL/dx--

Each batch is cut into ``microbatches`` so the stages work on different micro-batches at once
(the "bubble" idle fraction is (stages - 1) / (microbatches + stages - 1)). GPipe runs all
forwards then all backwards; 1F1B alternates, so at most ``stages`` micro-batches of activations
are alive. The schedule sums the micro-batch gradients and divides by their number: the same
gradient as the whole batch at once.

A stage wraps the GPT (or Llama) family's own modules (embedding, position table or RoPE, blocks, final
norm, head) without changing the model file. With tied embeddings (GPT-2) the first and last
stages each hold the shared matrix, and their gradients are summed between them after backward
(Megatron-LM's "embedding all-reduce") so both copies take the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmzoo.distributed.runtime import DistContext
from lmzoo.errors import ConfigError
from lmzoo.layers.attention import window_mask
from lmzoo.models.base import lm_loss


class GPTStage(nn.Module):
    """Blocks ``[start, end)`` of a :class:`lmzoo.models.gpt2.GPT`, plus its input or output end."""

    norm = "ln_f"  # the model's final norm (its name kept: the stage's state-dict names are the model's)

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__()
        cfg = model.config
        if getattr(cfg, "pos_emb", "learned") not in ("learned", "rope") or getattr(cfg, "kv_share_every", 1) > 1:
            raise ConfigError("pipeline parallel supports GPT models with learned or RoPE positions, no KV sharing")
        if getattr(cfg, "n_experts", 0):
            raise ConfigError("pipeline parallel does not carry mixture-of-experts router losses between stages")
        self.first, self.last, self.start = first, last, start
        # the last stage of a tied model keeps the embedding module too (its forward does not use it): the
        # shared matrix is then "wte.weight" on both stages, and the optimizer treats it as an embedding on both
        tied = last and getattr(cfg, "tie_embeddings", False)
        self.wte = model.wte if first or tied else None
        self.wpe = getattr(model, "wpe", None) if first else None
        self.drop = model.drop if first else None
        self.rope = model.rope  # a buffer table: every stage recomputes cos/sin for its blocks
        # keyed by the model's own block numbers, so a stage's state-dict names are the model's
        # ("blocks.3.attn.qkv.weight" on every layout): sharded checkpoints load across layouts
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, end)})
        setattr(self, self.norm, getattr(model, self.norm) if last else None)
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (B, T); later stages: hidden states (B, T, C). Last returns logits."""
        T = x.size(1)
        pos = torch.arange(T, device=x.device)
        if self.first:
            x = self.wte(x)
            if self.wpe is not None:
                x = x + self.wpe(pos)
            x = self.drop(x)
        rope = self.rope(pos, T) if self.rope is not None else None
        for i, block in self.blocks.items():
            x, _, _ = block(x, rope, None, True, None, int(i), None)
        if self.last:
            x = self.lm_head(self.ln_f(x))
        return x


class LlamaStage(GPTStage):
    """Blocks ``[start, end)`` of a :class:`lmzoo.models.llama.Llama` (Mistral too): RoPE, RMSNorm
    ``norm_f``, a causal or sliding-window mask per layer."""

    norm = "norm_f"

    def __init__(self, model: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__(model, start, end, first, last)
        self.windows = model.windows  # each layer's attention window (None: full causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        pos = torch.arange(T, device=x.device)
        if self.first:
            x = self.drop(self.wte(x))
        rope = self.rope(pos, T)
        masks = {w: window_mask(T, w, x.device) for w in set(self.windows)}  # (mask, is_causal) per window
        for i, block in self.blocks.items():
            mask, is_causal = masks[self.windows[int(i)]]
            x, _ = block(x, rope, mask, is_causal, None, int(i))
        if self.last:
            x = self.lm_head(self.norm_f(x))
        return x


STAGES = {"gpt2": GPTStage, "llama": LlamaStage}  # model family -> how to cut it
FAMILIES = tuple(STAGES)


def check_family(family: str, model_config=None) -> None:
    """One-line error for a model without a stage split (before any process group when called early)."""
    if getattr(model_config, "n_experts", 0):
        raise ConfigError("pipeline parallel does not carry mixture-of-experts router losses between stages")
    if family not in FAMILIES:
        raise ConfigError(
            f"pipeline parallel cuts {', '.join(FAMILIES)} models into stages; {family} has no stage split yet "
            "(use parallel.mode=fsdp or tp)"
        )


def stage_bounds(n_layer: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, as even as possible (earlier stages take the remainder)."""
    if stages > n_layer:
        raise ConfigError(f"{stages} pipeline stages need at least as many layers; the model has {n_layer}")
    base, extra = divmod(n_layer, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        out.append((start, end))
        start = end
    return out


class Pipeline:
    """This rank's stage and the schedule that trains it: ``step(x, y) -> loss`` (on every rank)."""

    def __init__(self, model: nn.Module, ctx: DistContext) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_family(getattr(model, "family", type(model).__name__))
        self.ctx, n = ctx, ctx.world_size
        start, end = stage_bounds(model.config.n_layer, n)[ctx.rank]
        self.first, self.last = ctx.rank == 0, ctx.rank == n - 1
        self.module = STAGES[model.family](model, start, end, self.first, self.last)
        self.tied = getattr(model.config, "tie_embeddings", False) and n > 1
        if self.tied and n > 2:
            raise ConfigError("tied embeddings (tie_embeddings=true) support at most 2 pipeline stages")
        device = next(model.parameters()).device
        self.stage = PipelineStage(self.module, ctx.rank, n, device)
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[ctx.config.schedule]
        self.scale = 1.0  # 1 / (pipeline micro-batches x accumulation steps), set by step()
        # scale_grads=False: the schedule would divide *all* of .grad, gradients accumulated from
        # earlier calls included; scaling each micro-batch's loss instead keeps accumulation exact
        self.schedule = schedule(
            self.stage, ctx.config.microbatches, loss_fn=lambda out, y: lm_loss(out, y) * self.scale, scale_grads=False
        )

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank updates (its stage's)."""
        return list(self.module.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor, accum: int = 1) -> float:
        """Forward and backward of one batch; the batch's mean loss (unscaled) on every rank.

        Gradients accumulate in the stage's parameters: call it ``accum`` times per optimizer step,
        each gradient weighted 1 / accum like the trainer's ``loss / accum``.
        """
        self.scale = 1.0 / (self.ctx.config.microbatches * accum)
        return self._run(self.schedule.step, x, y)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward only (no backward) through every stage; the batch's mean loss on every rank."""
        self.scale = 1.0 / self.ctx.config.microbatches
        return self._run(self.schedule.eval, x, y)

    def _run(self, run, x: torch.Tensor, y: torch.Tensor) -> float:
        """One schedule pass (``step`` or ``eval``): the first stage feeds ids, the last gets targets."""
        losses: list[torch.Tensor] = []
        if self.first:
            run(x)
        elif self.last:
            run(target=y, losses=losses)
        else:
            run()
        loss = torch.stack(losses).mean().detach() / self.scale if self.last else torch.zeros(())
        dist.all_reduce(loss)  # only the last stage contributes: everyone learns the loss
        return float(loss)

    def owner_of(self, param: nn.Parameter) -> bool:
        """Whether this rank's stage holds (and trains) ``param``."""
        return any(param is p for p in self.module.parameters())

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding/head gradient of the first and last stage (both copies take one step)."""
        if not self.tied:
            return
        w = self.module.wte.weight if self.first else self.module.lm_head.weight
        g = torch.zeros_like(w) if w.grad is None else w.grad
        dist.all_reduce(g)
        w.grad = g

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over all stages (the tied matrix counted once), then clip."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq = sum((g.float().norm() ** 2 for g in grads), torch.zeros(()))
        if self.tied and self.last and self.module.lm_head.weight.grad is not None:
            sq = sq - self.module.lm_head.weight.grad.float().norm() ** 2  # the first stage counts it
        dist.all_reduce(sq)
        total = float(sq.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total
