"""Process-group set-up for ``torchrun`` launches, the ``parallel`` config section, and its checks.

``torchrun --nproc_per_node=N -m lmzoo train ...`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads
them, checks the layout (before any collective, so a bad layout is an error message, not a hang)
and initialises the default process group (NCCL on GPUs, gloo on CPUs) with a timeout, so a
collective whose peer died fails instead of waiting forever. docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from lmzoo.config import Config
from lmzoo.errors import ConfigError, suggest

MODES = ("none", "ddp", "fsdp", "tp", "pp")


@dataclasses.dataclass
class ParallelConfig(Config):
    """The ``parallel`` section of a TrainConfig (a dict there; parsed and checked here: a Config, so its
    values are converted to their types, and NaN or infinities refused, as they enter).

    mode: none | ddp | fsdp | tp | pp. Data-parallel modes (ddp, fsdp) split each batch across all
    ranks; tp and pp use every rank on the same batch (one model replica across N processes).
    """

    mode: str = "none"
    timeout_s: float = 600.0  # a collective waiting longer than this fails (a peer died or hung)
    backend: str | None = None  # default: nccl on CUDA, gloo otherwise
    # fsdp
    reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3); False: ZeRO-2-like
    mp_param_dtype: str | None = None  # MixedPrecisionPolicy: compute dtype of gathered params (bfloat16)
    mp_reduce_dtype: str | None = None  # dtype of gradient reduce-scatter (float32 is the safe choice)
    # pp
    microbatches: int = 2  # micro-batches a pipeline splits each batch into
    schedule: str = "gpipe"  # gpipe | 1f1b

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ParallelConfig:
        d = dict(d or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in names:
                raise ConfigError(f"unknown parallel setting {k!r}; known: {', '.join(names)}{suggest(k, names)}")
        pc = cls(**d)
        if pc.mode not in MODES:
            raise ConfigError(
                f"unknown parallel mode {pc.mode!r}; choose from {', '.join(MODES)}{suggest(pc.mode, MODES)}"
            )
        if pc.schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"unknown pipeline schedule {pc.schedule!r}; choose gpipe or 1f1b")
        if pc.microbatches < 1 or pc.timeout_s <= 0:
            raise ConfigError("parallel.microbatches must be >= 1 and parallel.timeout_s > 0")
        return pc

    @property
    def data_parallel(self) -> bool:
        return self.mode in ("none", "ddp", "fsdp")


@dataclasses.dataclass
class DistContext:
    """Where this process sits: its rank, the world, and its share of the data."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    config: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    mesh: Any = None  # a 1-D DeviceMesh over all ranks (fsdp, tp)
    owns_group: bool = False  # setup() created the process group, so teardown() ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes logs, progress bars and single-file checkpoints."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank if self.config.data_parallel else 0

    @property
    def dp_size(self) -> int:
        return self.world_size if self.config.data_parallel else 1


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_layout(
    pc: ParallelConfig, world_size: int, batch_size: int, global_batch: int | None = None, model_config: Any = None
) -> None:
    """Raise a one-line ConfigError for a layout that cannot work, before any process group exists."""
    if world_size > 1 and pc.mode == "none":
        pc.mode = "ddp"  # torchrun with no parallel section: plain data parallel
    if pc.mode == "none" or world_size == 1:
        return
    if pc.data_parallel and global_batch is not None and global_batch % (batch_size * world_size):
        raise ConfigError(
            f"global_batch {global_batch} is not divisible by batch_size {batch_size} x world size {world_size}; "
            f"choose a multiple of {batch_size * world_size}"
        )
    if model_config is None:
        return
    if pc.mode == "tp":
        n_head = getattr(model_config, "n_head", None)
        n_kv = getattr(model_config, "n_kv_head", None) or n_head
        if n_head is None or n_head % world_size or n_kv % world_size:
            raise ConfigError(
                f"tensor parallel degree {world_size} must divide the attention heads (n_head {n_head}, "
                f"n_kv_head {n_kv}): each rank computes whole heads"
            )
        hidden = getattr(model_config, "hidden", None)
        if hidden is not None and hidden % world_size:
            raise ConfigError(f"tensor parallel degree {world_size} must divide the MLP hidden size {hidden}")
    if pc.mode == "pp":
        n_layer = getattr(model_config, "n_layer", 0)
        if world_size > n_layer:
            raise ConfigError(f"{world_size} pipeline stages need at least as many layers; the model has {n_layer}")
        if batch_size % pc.microbatches:
            raise ConfigError(f"batch_size {batch_size} is not divisible by parallel.microbatches {pc.microbatches}")


def setup(parallel: dict[str, Any] | None, batch_size: int, global_batch: int | None = None, model_config: Any = None,
          device_type: str = "cpu") -> DistContext:
    """Check the layout, then join the process group torchrun prepared (nothing when WORLD_SIZE is 1)."""
    pc = ParallelConfig.from_dict(parallel)
    rank, local_rank, world = env_world()
    check_layout(pc, world, batch_size, global_batch, model_config)
    ctx = DistContext(rank, world, local_rank, pc)
    if world == 1:
        return ctx
    if not dist.is_initialized():
        backend = pc.backend or ("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=pc.timeout_s))
        ctx.owns_group = True
    if pc.mode in ("fsdp", "tp"):
        from torch.distributed.device_mesh import init_device_mesh

        ctx.mesh = init_device_mesh(device_type, (world,))
    return ctx


def teardown(ctx: DistContext | None = None) -> None:
    """Leave the process group after a successful run (idempotent; with ``ctx``, only a group that
    :func:`setup` created: a caller's own group stays theirs).

    All ranks meet at a barrier first, so nobody tears down while a peer still waits on it. Exiting
    without this lets gloo's worker threads die with the interpreter ("terminate called without an
    active exception", SIGABRT after a run that succeeded). Not for error paths: there a peer may be
    inside a collective, and torchrun stops the job anyway.
    """
    if not dist.is_initialized() or (ctx is not None and not ctx.owns_group):
        return
    dist.barrier()
    dist.destroy_process_group()
    if ctx is not None:
        ctx.owns_group, ctx.mesh = False, None


def reduce_mean(value: float | torch.Tensor, ctx: DistContext) -> float:
    """The mean of a scalar over all ranks (a float on every rank); the value itself in one process."""
    if not ctx.enabled:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone().reshape(1)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. prepares the data set); the others wait, then run it (and find
    the work done). Without this every rank would write the same files at once."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if ctx.enabled and ctx.is_main:
            dist.barrier()
