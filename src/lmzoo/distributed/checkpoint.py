"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), loadable on any number of ranks.

Under FSDP2 each rank holds 1/N of every weight and optimizer moment. Gathering them onto rank 0
to write one file costs the whole model's memory on one process; instead every rank writes its own
shards plus a metadata file that records which slice of which tensor each shard is. Loading asks
for the tensors the *loading* job's layout needs (its own sharding, or whole tensors on one
process) and DCP reads the overlapping slices: saved with 2 ranks, loaded with 1, 4 or 8.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (and optimizer) state as a DCP checkpoint directory; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if extra:
        state["extra"] = extra
    with _single_process_quietly() as single:
        dcp.save(state, checkpoint_id=str(path), no_dist=single)


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Fill ``model`` (plain, FSDP2 or TP; any world size) in place from a DCP directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(model)}  # the layout to read into
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _single_process_quietly() as single:  # one process (no process group): read every slice ourselves
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[bool]:
    """Whether this is one process without a process group (DCP then warns that it assumes so: we mean it)."""
    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield single
