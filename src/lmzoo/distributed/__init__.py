"""Training on several processes with PyTorch's own engine (torch.distributed), from outside the model.

Launch with ``torchrun --nproc_per_node=N -m lmzoo train --parallel.mode=ddp ...``; see
docs/distributed.md for each mode (ddp, fsdp, tp, pp) and what it shards.
"""

from lmzoo.distributed.engine import TrainerParallel, loader_state, parallelize_for_trainer
from lmzoo.distributed.parallelize import clip_grad_norm, full_value, gradient_sync, parallelize
from lmzoo.distributed.runtime import (
    MODES,
    DistContext,
    ParallelConfig,
    check_layout,
    main_first,
    reduce_mean,
    setup,
    teardown,
)

__all__ = [
    "MODES", "DistContext", "ParallelConfig", "TrainerParallel", "check_layout", "clip_grad_norm", "full_value",
    "gradient_sync", "loader_state", "main_first",
    "parallelize", "parallelize_for_trainer", "reduce_mean", "setup", "teardown",
]
