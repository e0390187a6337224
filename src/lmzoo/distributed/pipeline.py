"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe, Huang et al. 2019; 1F1B,
Narayanan et al. 2019): rank r holds a contiguous run of blocks and passes activations on.

::

    rank 0: embed (+ pos_embed) -> blocks[0:k]   --x-->   rank 1: blocks[k:L] -> norm -> head -> loss
                                  <--dL/dx--

Each batch is cut into ``microbatches`` so the stages work on different micro-batches at once
(the "bubble" idle fraction is (stages - 1) / (microbatches + stages - 1)). GPipe runs all
forwards then all backwards; 1F1B alternates, so at most ``stages`` micro-batches of activations
are alive. The schedule sums the micro-batch gradients and divides by their number: the same
gradient as the whole batch at once.

A stage is the model itself with the parts it does not hold set to ``None`` (torchtitan's way;
:func:`stage_of`): the first stage keeps the input parts (embedding, a position table), the last
the final norm and head, each its own blocks, keyed by their layer index so that a stage's
state-dict names are the model's. The model's own forward serves every stage: a later stage's
``begin`` takes the previous stage's hidden states in place of token ids, and a stage without a
head returns hidden states (:mod:`lmzoo.models.base`). So every family pipelines, except where a
block reads another layer's state (cross-layer KV sharing).

Mixture of experts: each stage adds its layers' router losses (sums over its MoE layers) to two
running totals it passes on with the hidden states; the last stage divides by the model's number
of MoE layers and adds them to the loss, as the whole model's forward does. The gradient of those
totals flows back through the pipeline like the activations'.

With tied embeddings (GPT-2) the first and last stages each hold the shared matrix, and their
gradients are summed between them after backward (Megatron-LM's "embedding all-reduce") so both
copies take the same step.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from lmzoo.distributed.runtime import DistContext
from lmzoo.errors import ConfigError
from lmzoo.layers.moe import MoE, add_router_losses
from lmzoo.models.base import Blocks, LanguageModel, lm_loss


def check_family(family: str, model_config=None) -> None:
    """One-line error for a model whose blocks read other layers' state (before any process group
    when called early): a stage could not hand that state on."""
    share = getattr(model_config, "kv_share_every", 1)
    if share > 1:
        raise ConfigError(
            f"pipeline parallel cannot cut the {family} model: its layers share keys/values in runs of "
            f"kv_share_every={share}, so a block reads another layer's state (use parallel.mode=fsdp or tp)"
        )


def stage_of(model: LanguageModel, start: int, end: int, first: bool, last: bool, tied: bool) -> LanguageModel:
    """The stage holding blocks ``[start, end)`` of ``model``: a second view of the same modules (no
    weight is copied), with the parts the stage does not hold set to None. The last stage of a tied
    model keeps the embedding too (its forward does not use it): the shared matrix is then
    ``embed.weight`` on both stages, and the optimizer treats it as an embedding on both."""
    stage = copy.copy(model)  # the same class, attributes and modules; its own tables of parts below
    stage._modules, stage._parameters, stage._buffers = dict(model._modules), dict(model._parameters), dict(
        model._buffers)
    for name in model.input_parts:
        if not (first or (last and tied and name == "embed")):
            setattr(stage, name, None)
    stage.blocks = Blocks()
    for i in range(start, end):
        stage.blocks[i] = model.blocks[i]
    if not last:
        stage.norm = stage.head = None
    return stage


class _StageForward(nn.Module):
    """What the schedule runs on a rank: the stage's own forward; with mixture-of-experts layers, the
    running sums of the router losses travel beside the hidden states (see the module docstring)."""

    def __init__(self, stage: LanguageModel, carries_router: bool):
        super().__init__()
        self.stage, self.carries_router = stage, carries_router
        self.n_moe = sum(isinstance(b.ffn, MoE) for b in stage.blocks)

    def forward(self, x: torch.Tensor, *sums: torch.Tensor):
        out = self.stage(x)
        if not self.carries_router:
            return out.logits
        balance, z = sums if sums else (out.logits.new_zeros(1, dtype=torch.float32),) * 2
        if out.aux is not None:  # this stage's MoE layers: their mean times their number
            balance = balance + out.aux["moe_balance"].float() * self.n_moe
            z = z + out.aux["moe_z"].float() * self.n_moe
        return out.logits, balance, z


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

    def __init__(self, model: LanguageModel, ctx: DistContext) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_family(model.family, model.config)
        self.ctx, n = ctx, ctx.world_size
        start, end = stage_bounds(model.config.n_layer, n)[ctx.rank]
        self.first, self.last = ctx.rank == 0, ctx.rank == n - 1
        self.tied = getattr(model.config, "tie_embeddings", False) and n > 1
        if self.tied and n > 2:
            raise ConfigError("tied embeddings (tie_embeddings=true) support at most 2 pipeline stages")
        # router losses: the whole model's MoE layers and their weights (the last stage adds them)
        self.n_moe = sum(isinstance(b.ffn, MoE) for b in model.blocks)
        self.router_weights = (model.config.moe_aux_weight, model.config.moe_z_weight) if self.n_moe else None
        self.module = stage_of(model, start, end, self.first, self.last, self.tied)
        device = next(model.parameters()).device
        self.stage = PipelineStage(_StageForward(self.module, self.n_moe > 0), ctx.rank, n, device)
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[ctx.config.schedule]
        self.scale = 1.0  # 1 / (pipeline micro-batches x accumulation steps), set by step()
        self.with_router = True  # training adds the router losses; evaluation reports the cross-entropy
        # scale_grads=False: the schedule would divide *all* of .grad, gradients accumulated from
        # earlier calls included; scaling each micro-batch's loss instead keeps accumulation exact
        self.schedule = schedule(self.stage, ctx.config.microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, out, y: torch.Tensor) -> torch.Tensor:
        """The last stage's objective for one micro-batch: cross-entropy (+ the router losses)."""
        if self.router_weights is None:
            return lm_loss(out, y) * self.scale
        logits, balance, z = out
        loss = lm_loss(logits, y)
        if self.with_router:  # the model's own objective: the router losses averaged over its MoE layers
            aux = {"moe_balance": balance.sum() / self.n_moe, "moe_z": z.sum() / self.n_moe}
            loss = add_router_losses(loss, aux, *self.router_weights)
        return loss * self.scale

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank updates (its stage's)."""
        return list(self.module.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor, accum: int = 1) -> float:
        """Forward and backward of one batch; the batch's mean loss (unscaled) on every rank.

        Gradients accumulate in the stage's parameters: call it ``accum`` times per optimizer step,
        each gradient weighted 1 / accum like the trainer's ``loss / accum``.
        """
        self.scale, self.with_router = 1.0 / (self.ctx.config.microbatches * accum), True
        return self._run(self.schedule.step, x, y)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward only (no backward) through every stage; the batch's mean cross-entropy on every rank."""
        self.scale, self.with_router = 1.0 / self.ctx.config.microbatches, False
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
        w = self.module.embed.weight if self.first else self.module.head.weight
        g = torch.zeros_like(w) if w.grad is None else w.grad
        dist.all_reduce(g)
        w.grad = g

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over all stages (the tied matrix counted once), then clip."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq = sum((g.float().norm() ** 2 for g in grads), torch.zeros(()))
        if self.tied and self.last and self.module.head.weight.grad is not None:
            sq = sq - self.module.head.weight.grad.float().norm() ** 2  # the first stage counts it
        dist.all_reduce(sq)
        total = float(sq.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total
