"""Batches of (input, target) token windows read from a prepared data set.

The ``.bin`` file is memory-mapped afresh for every batch: a long-lived ``np.memmap`` keeps every
page it has touched mapped and counted in the process's resident memory, so over an epoch of a
large corpus RSS climbs toward the file size (nanoGPT's "memory leak"). Opening a map costs
microseconds; a batch costs far more.

Positions are pure functions of the step counter, so resuming needs only ``state_dict()["step"]``:

- random: batch ``s`` of rank ``r`` draws ``batch_size`` start offsets uniformly from a numpy PCG64
  generator seeded with ``(seed, r, s)``;
- sequential: the split is cut into ``(tokens - 1) // block_size`` non-overlapping windows; row
  ``i`` of batch ``s`` on rank ``r`` is window ``((s * world_size + r) * batch_size + i) mod W``, so
  each step the ranks read consecutive, disjoint stretches and one epoch covers every window once.
- stream (Transformer-XL's batching): the windows are dealt into ``batch_size * world_size`` lanes
  of ``L = W // (batch_size * world_size)`` consecutive windows; row ``i`` of batch ``s`` on rank
  ``r`` is window ``s mod L`` of lane ``r * batch_size + i``. Each row thus continues, batch after
  batch, exactly where it stopped: a model carrying a memory across batches reads a long stream.

``prefetch=True`` reads batch ``s + 1`` in a background thread while the caller computes on batch
``s`` (the GPU is busy, the CPU would wait): reading, pinning and the non-blocking copy overlap the
step. The batches are the same (a batch is a pure function of its step), so is resuming.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmzoo.data.prepare import SPLITS, load_meta
from lmzoo.errors import ConfigError, DataError, suggest

MODES = ("random", "sequential", "stream")


class TokenLoader:
    """Endless ``(x, y)`` batches from ``data_dir/{split}.bin``.

    ``x`` and ``y`` are int64 tensors of shape (batch_size, block_size) on ``device``, with
    ``y[:, t] == x[:, t + 1]`` for t < block_size - 1 (y is x shifted left by one token).
    ``rank`` / ``world_size`` shard the data across data-parallel processes: ranks get different
    windows (random: different generator streams; sequential: disjoint windows).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        mode: str = "random",
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        prefetch: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(
                f"unknown split {split!r}; choose from {', '.join(SPLITS)}{suggest(split, SPLITS)}"
            )
        if mode not in MODES:
            raise ConfigError(
                f"unknown loader mode {mode!r}; choose from {', '.join(MODES)}{suggest(mode, MODES)}"
            )
        if block_size < 1 or batch_size < 1:
            raise ConfigError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in range(world_size={world_size})")
        self.meta = load_meta(data_dir)
        self.path = Path(data_dir) / f"{split}.bin"
        self.dtype = np.dtype(self.meta["dtype"])
        self.num_tokens = int(self.meta[f"{split}_tokens"])
        if block_size > self.num_tokens - 1:
            raise DataError(
                f"block_size {block_size} is larger than the {split} split minus one "
                f"({self.num_tokens} tokens - 1 = {self.num_tokens - 1}); use a smaller block_size "
                "or more data"
            )
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.mode, self.rank, self.world_size = seed, mode, rank, world_size
        self.device = torch.device(device)
        self.step = 0  # batches produced so far; the whole resumable state
        self.prefetch = prefetch
        self._ahead: tuple[int, Future] | None = None  # (step, the batch being read in the background)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def num_windows(self) -> int:
        """Non-overlapping windows in the split (sequential mode's epoch, over all ranks)."""
        return (self.num_tokens - 1) // self.block_size

    def _starts(self, step: int) -> np.ndarray:
        """Start offsets (batch_size,) of the rows of batch ``step`` for this rank."""
        if self.mode == "random":
            rng = np.random.default_rng((self.seed, self.rank, step))
            return rng.integers(0, self.num_tokens - self.block_size, size=self.batch_size)
        if self.mode == "stream":
            lanes = self.batch_size * self.world_size
            per_lane = self.num_windows // lanes
            if per_lane == 0:
                raise DataError(
                    f"stream mode needs a window of {self.block_size} tokens per row: {self.num_windows} windows "
                    f"in the {self.split} split < {lanes} rows; use a smaller batch_size or block_size"
                )
            lane = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
            return (lane * per_lane + step % per_lane) * self.block_size
        first = (step * self.world_size + self.rank) * self.batch_size
        windows = (first + np.arange(self.batch_size, dtype=np.int64)) % self.num_windows
        return windows * self.block_size

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step`` (does not move the loader)."""
        span = self.block_size + 1
        data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        rows = np.empty((self.batch_size, span), dtype=np.int64)
        for i, start in enumerate(self._starts(step)):
            rows[i] = data[start : start + span]
        del data  # unmap now: see the module docstring
        # numpy makes the shifted copies: torch's strided copy was 100x slower on a 2-core CPU
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.device.type == "cuda":  # page-locked memory lets the copy overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``; both int64 of shape (batch_size, block_size)."""
        ahead, self._ahead = self._ahead, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == self.step else self.batch_at(self.step)
        self.step += 1
        if self.prefetch:  # start reading the next one now; it is ready when the step asks for it
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmzoo-prefetch")
            self._ahead = (self.step, self._pool.submit(self.batch_at, self.step))
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the step, plus settings checked on load."""
        return {
            "step": self.step,
            "seed": self.seed,
            "mode": self.mode,
            "split": self.split,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next batches equal those an uninterrupted loader would give.

        Raises ConfigError when the state was saved with another mode, split, block or batch size.
        """
        for key in ("mode", "split", "block_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}"
                )
        self.seed = int(state.get("seed", self.seed))
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"TokenLoader({self.path}, {self.num_tokens} tokens, mode={self.mode}, "
            f"block_size={self.block_size}, batch_size={self.batch_size}, "
            f"rank={self.rank}/{self.world_size}, step={self.step})"
        )
