"""Gradient (activation) checkpointing per block, applied from outside the model.

Backpropagation needs every intermediate activation of the forward pass. For a Transformer
block that is about ``34 * B * T * d + 5 * B * n_head * T^2`` bytes in 16-bit (Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models"), times ``n_layer``. With
checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") a block keeps
only its input; backward runs the block's forward again to rebuild the rest. Memory for
activations drops from L blocks' worth to one block's worth plus L block inputs, for about one
extra forward pass (~33% more compute: forward 1 + backward 2 becomes 1 + 1 + 2).

Every family's blocks are found through the model contract (``model.block_modules()``, the
blocks of :mod:`lmzoo.models.base`, a multi-token wrapper's heads included) and every block is
called the same way, ``block(x, ctx, layer)``. No model file changes: each block's ``forward`` is
replaced on the instance by one that calls the original through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. Parameter names, state dicts and
checkpoints are unchanged. Decoding (a cache in the context, or no grad) runs the block plainly: a
recomputation would write the decoding state twice.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to checkpoint: every residual block of the model (``model.block_modules()``)."""
    return [block for _, block in model.block_modules()]


def _checkpointed(orig):
    def forward(self, x, ctx, layer):
        if ctx.cache is not None or not (self.training and torch.is_grad_enabled()):
            return orig(self, x, ctx, layer)
        return checkpoint(orig, self, x, ctx, layer, use_reentrant=False)

    return forward


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of ``model`` (in place); returns how many were wrapped. Idempotent."""
    n = 0
    for block in checkpointable_blocks(model):
        if getattr(block, "_lmzoo_checkpointed", False):
            continue
        block.forward = types.MethodType(_checkpointed(type(block).forward), block)
        block._lmzoo_checkpointed = True
        n += 1
    return n


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`apply_activation_checkpointing` (back to the class's forward)."""
    for block in checkpointable_blocks(model):
        if getattr(block, "_lmzoo_checkpointed", False):
            del block.forward
            del block._lmzoo_checkpointed


def peak_memory_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    CUDA: the caching allocator's own peak counter. CPU (no allocator statistics there; tracemalloc
    does not see torch's allocations): the profiler's per-operator memory records, replayed in time
    order; the running sum's maximum is the peak at operator granularity.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
