"""What ``lmzoo train`` needs from a parallel mode, behind one object (:class:`TrainerParallel`).

The trainer stays a single-device loop; per mode this module decides

- what to call for a training step (the DDP wrapper, the sharded model itself, or, for pipeline
  parallel, a :class:`~lmzoo.distributed.pipeline.Pipeline` whose schedule runs forward and backward);
- which parameters the optimizer owns (all of them, their shards, or this rank's stage);
- the global gradient norm and clipping (sharded gradients counted once);
- checkpoints. ddp writes the usual single file from rank 0. fsdp, tp and pp write, in every
  ``ckpt-<step>`` directory, both
  ``model.safetensors`` — the whole model gathered onto rank 0, in the model's own layout, so
  ``lmzoo.load`` / ``lmzoo generate`` work on one process — and ``dcp/`` — every rank's shards of
  the weights *and optimizer state*, written in parallel by ``torch.distributed.checkpoint``;
  ``--resume`` reads ``dcp/`` into whatever layout the resuming job has (another number of
  ranks, or another mode), except that a tensor-parallel checkpoint resumes only with the same
  tensor-parallel degree (its qkv rows are grouped by rank; see ``apply_tp``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from lmzoo.config import read_json
from lmzoo.distributed.checkpoint import load_sharded, save_sharded
from lmzoo.distributed.parallelize import clip_grad_norm, parallelize, qkv_rank_order
from lmzoo.distributed.runtime import DistContext, check_layout
from lmzoo.errors import CheckpointError
from lmzoo.formats.atomic import atomic_write_text

SHARDS, LAYOUT = "dcp", "layout.json"


class TrainerParallel:
    """The trainer's handle on its parallel mode; ``mode`` is ``none`` in a single process.

    Attributes: ``module`` (call it for a training step; None under pp), ``pipeline`` (pp only),
    ``opt_module`` (give it to the optimizer), ``sharded`` (checkpoints go through DCP).
    """

    def __init__(self, model: nn.Module, ctx: DistContext) -> None:
        self.model, self.ctx = model, ctx
        self.mode = ctx.config.mode if ctx.enabled else "none"
        self.sharded = self.mode in ("fsdp", "tp", "pp")
        self.pipeline = None
        if self.mode == "pp":
            from lmzoo.distributed.pipeline import Pipeline

            self.pipeline = Pipeline(model, ctx)
            self.module, self.opt_module = None, self.pipeline.module
        else:
            self.module, self.opt_module = parallelize(model, ctx), model

    # -- the step -----------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm (before clipping) over every rank's gradients; clips to ``max_norm``."""
        if self.pipeline is not None:
            self.pipeline.sync_tied_grads()  # first and last stage hold the tied matrix: sum its gradient
            return self.pipeline.clip_grad_norm(max_norm)
        if self.mode in ("fsdp", "tp"):
            return float(clip_grad_norm(list(self.model.parameters()), max_norm))
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    # -- checkpoints --------------------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights in its own layout, on rank 0 (None elsewhere); every rank calls it.

        None for ddp / one process: the trainer's ``self.model`` already holds them.
        """
        if not self.sharded:
            return None
        if self.pipeline is not None:
            return self._gather_stages()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict: all-gather each DTensor; cpu_offload: only rank 0 keeps the result
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return None
        shared = _tied_names(self.model)
        full = {k: v.contiguous() for k, v in full.items() if k not in shared}
        if self.mode == "tp":
            _ungroup_qkv_rows(self.model, full, self.ctx.world_size)
        return full

    def _gather_stages(self) -> dict[str, torch.Tensor] | None:
        """pp: every parameter travels from the first stage that holds it to rank 0."""
        pipe = self.pipeline
        owners = torch.tensor([1 if pipe.owner_of(p) else 0 for p in self.model.parameters()])
        table = [torch.zeros_like(owners) for _ in range(self.ctx.world_size)]
        tdist.all_gather(table, owners)  # which ranks hold which parameters
        held = torch.stack(table)  # (ranks, params)
        for i, p in enumerate(self.model.parameters()):
            src = int(held[:, i].nonzero()[0])
            if src != 0:  # rank 0's copy of a later stage's parameter is stale: fetch it
                if self.ctx.rank == src:
                    tdist.send(p.detach().contiguous(), 0)
                elif self.ctx.is_main:
                    buf = torch.empty_like(p)
                    tdist.recv(buf, src)
                    p.data.copy_(buf)
        if not self.ctx.is_main:
            return None
        from lmzoo.formats.checkpoint import model_state

        return model_state(self.model)

    def save_shards(self, path: Path, optimizer: torch.optim.Optimizer) -> Path | None:
        """Every rank writes its shards of weights and optimizer state to ``path`` (a DCP directory)."""
        if not self.sharded:
            return None
        if self.ctx.is_main and path.exists():
            shutil.rmtree(path)  # a partial directory left by a crash
        tdist.barrier()
        save_sharded(path, self.opt_module, optimizer)
        if self.ctx.is_main:
            atomic_write_text(path / LAYOUT, json.dumps({"mode": self.mode, "world_size": self.ctx.world_size}))
        return path

    def load_shards(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Resume: read a DCP directory (any number of ranks, any mode but another TP degree)."""
        layout = read_json(path / LAYOUT, CheckpointError) if (path / LAYOUT).is_file() else {}
        saved_tp = layout.get("world_size", 1) if layout.get("mode") == "tp" else 1
        my_tp = self.ctx.world_size if self.mode == "tp" else 1
        if saved_tp != my_tp:
            raise CheckpointError(
                f"cannot resume {path.parent} with tensor parallel degree {my_tp}: its shards have degree {saved_tp} "
                "(tp groups qkv rows by rank); resume with the same degree, or start a new run from its weights"
            )
        load_sharded(path, self.opt_module, optimizer)


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that repeat an earlier parameter (a tied head), written once."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def _ungroup_qkv_rows(model: nn.Module, full: dict[str, torch.Tensor], tp: int) -> None:
    """Undo apply_tp's grouping of qkv rows by rank, in place in ``full`` (the model's own order again)."""
    for i, block in model.blocks.indexed():
        attn = block.mixer  # after apply_tp it counts this rank's heads: n_head / tp
        back = qkv_rank_order(attn.head_dim, attn.n_head * tp, attn.n_kv_head * tp, tp).argsort()
        for kind in ("weight", "bias"):
            key = f"blocks.{i}.mixer.qkv.{kind}"
            if key in full:
                full[key] = full[key][back].contiguous()


def parallelize_for_trainer(model: nn.Module, ctx: DistContext, batch_size: int,
                            global_batch: int | None) -> TrainerParallel:
    """The trainer's hook: check the layout against the built model, then apply the mode."""
    check_layout(ctx.config, ctx.world_size, batch_size, global_batch, getattr(model, "config", None))
    return TrainerParallel(model, ctx)



def loader_state(state: dict, dp_size: int) -> dict:
    """A data loader's resume state saved with another number of data-parallel ranks, in this run's units.

    A loader counts its own batches; the rows read so far are ``step x batch_size x world_size``.
    With the same batch size, N ranks then continue where M ranks stopped (exactly so with
    ``data_order=sequential``, which deals consecutive windows to the ranks).
    """
    saved = int(state.get("world_size", 1))
    if saved == dp_size:
        return state
    return {**state, "step": int(state["step"]) * saved // dp_size, "world_size": dp_size}
