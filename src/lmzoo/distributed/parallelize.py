"""Apply data / fully-sharded / tensor parallelism to a single-device model, from outside it.

A model file knows nothing of this module (torchtitan's "parallelize" step): it relies on the parts
every family names the same way (:mod:`lmzoo.models.base`): ``model.blocks``, and inside a block the
``mixer`` (for tensor parallel, an attention with ``qkv`` / ``proj``:
:class:`lmzoo.layers.attention.CausalSelfAttention`) and the ``ffn`` (``fc`` / ``proj`` of an MLP, or
``gate`` / ``up`` / ``down`` of SwiGLU). docs/distributed.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmzoo.common import DTYPES
from lmzoo.distributed.runtime import DistContext
from lmzoo.errors import ConfigError
from lmzoo.layers.attention import CausalSelfAttention
from lmzoo.layers.mlp import MLP, SwiGLU


def parallelize(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Return the module to call for training steps; ``model`` itself keeps its state-dict names.

    - ddp: a ``DistributedDataParallel`` wrapper (weights replicated, gradients all-reduced).
    - fsdp: ``fully_shard`` each block, then the root, in place (weights, grads and optimizer
      state become DTensors sharded on dim 0); returns ``model``.
    - tp: column/row-parallel attention and MLP in every block, in place; returns ``model``.
    - pp: not here: see :mod:`lmzoo.distributed.pipeline` (the model is cut into stages).
    """
    mode = ctx.config.mode
    if not ctx.enabled or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        return apply_fsdp(model, ctx)
    if mode == "tp":
        return apply_tp(model, ctx)
    raise ConfigError(f"parallel mode {mode!r} is applied by lmzoo.distributed.pipeline, not parallelize()")


def apply_fsdp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """FSDP2: one all-gather / reduce-scatter group per block, the rest (embeddings, head) at the root.

    Sharding per block (not the whole model at once) lets a block's all-gather overlap the previous
    block's compute and bounds the unsharded weights alive at any time to about one block.
    """
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.5 (the declared floor) has FSDP2 only under its pre-release path
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    pc = ctx.config
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[pc.mp_param_dtype] if pc.mp_param_dtype else None,
        reduce_dtype=DTYPES[pc.mp_reduce_dtype] if pc.mp_reduce_dtype else None,
    )
    for block in model.blocks:
        fully_shard(block, mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=pc.reshard_after_forward)
    # the root group holds embeddings, head and final norm (tied wte/lm_head stay one parameter);
    # it is needed right after backward anyway, so keeping it gathered saves one all-gather
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def apply_tp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Megatron-style tensor parallelism (Shoeybi et al. 2019) with DTensor plans.

    Per block two all-reduces in forward: the first linear of attention (qkv) and of the MLP
    (fc, or gate and up) is column-parallel (each rank computes some output features: whole heads,
    or a slice of the hidden units), the second (proj, down) row-parallel (each rank contracts its
    slice; the partial sums are all-reduced). Embeddings, norms and head stay replicated.

    GPT-2's qkv is one fused matrix whose rows are [q heads | k heads | v heads]; a plain column
    split would give rank 0 all of q. We first permute the rows to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
    (rank r's heads together), so rank r's contiguous shard holds exactly its own q, k and v heads,
    and tell the attention module it now has n_head / tp heads. The permutation is a relabelling of
    the same weights; the sharded model computes the same function.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = ctx.world_size
    for block in model.blocks:
        plan: dict[str, object] = {}
        attn = block.mixer
        if type(attn) is not CausalSelfAttention:
            raise ConfigError(f"tensor parallel splits softmax attention by heads; the {model.family} model's "
                              f"mixer is a {type(attn).__name__}")
        if attn.n_head % tp or attn.n_kv_head % tp:
            raise ConfigError(
                f"tensor parallel degree {tp} must divide n_head {attn.n_head} and n_kv_head {attn.n_kv_head}"
            )
        _group_qkv_rows_by_rank(attn, tp)
        attn.n_head //= tp
        attn.n_kv_head //= tp
        plan["mixer.qkv"] = ColwiseParallel()
        plan["mixer.proj"] = RowwiseParallel()
        ffn = block.ffn
        if type(ffn) is MLP:
            plan["ffn.fc"], plan["ffn.proj"] = ColwiseParallel(), RowwiseParallel()
        elif type(ffn) is SwiGLU:
            plan["ffn.gate"], plan["ffn.up"], plan["ffn.down"] = ColwiseParallel(), ColwiseParallel(), RowwiseParallel()
        else:
            raise ConfigError(f"tensor parallel has no plan for the {model.family} model's ffn, a {type(ffn).__name__}")
        parallelize_module(block, ctx.mesh, plan)
    return model


def qkv_rank_order(head_dim: int, n_head: int, n_kv_head: int, tp: int) -> torch.Tensor:
    """Row order taking qkv's [q | k | v] to [q_r k_r v_r for each rank r] (see apply_tp).

    ``w[qkv_rank_order(...)]`` groups the rows by rank; ``w[qkv_rank_order(...).argsort()]`` undoes it
    (a tensor-parallel checkpoint is written in the model's own [q | k | v] order).
    """
    hd = head_dim
    q, k, v = torch.arange((n_head + 2 * n_kv_head) * hd).split([n_head * hd, n_kv_head * hd, n_kv_head * hd])
    return torch.cat([torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)])


@torch.no_grad()
def _group_qkv_rows_by_rank(attn: nn.Module, tp: int) -> None:
    """Reorder qkv's output rows from [q | k | v] to [q_r k_r v_r for each rank r] (see apply_tp)."""
    order = qkv_rank_order(attn.head_dim, attn.n_head, attn.n_kv_head, tp)
    attn.qkv.weight.copy_(attn.qkv.weight[order])
    if attn.qkv.bias is not None:
        attn.qkv.bias.copy_(attn.qkv.bias[order])


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the last.

    Gradient accumulation sums gradients locally; communicating after every micro-batch would send
    the same volume ``grad_accum`` times for nothing. DDP: ``no_sync()``; FSDP2:
    ``set_requires_gradient_sync(False)`` (gradients then stay unsharded until the last one).
    """
    if sync:
        yield
        return
    if hasattr(module, "no_sync"):  # DistributedDataParallel
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. the total gradient norm under FSDP2/TP); a tensor unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes a mix of DTensor and plain gradients (tensor parallel:
    sharded matrices next to replicated norms and embeddings); returns the global norm (a tensor).

    A sharded gradient's norm is computed on its shards and combined (``full_tensor`` of a scalar);
    a replicated gradient is the same on every rank and counted once.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in grads:
        n = g.norm(dtype=torch.float32) if not isinstance(g, DTensor) else g.norm().full_tensor().float()
        sq = sq + n.to(sq.device) ** 2
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total
