"""Resident memory of the training loader over many batches from a large memory-mapped shard.

    python benchmarks/loader_memory.py [--gb 1.0] [--batches 10000] [--batch-size 32] [--block-size 1024]

A prepared data set whose ``train.bin`` holds ``--gb`` GB of random uint16 tokens is written to a
temporary directory (deleted afterwards). ``TokenLoader`` (random mode) then draws ``--batches``
batches and the process's RSS is read every 500 batches. The known failure of memmap loaders: one
long-lived ``np.memmap`` keeps every page it touched mapped and counted as resident, so RSS climbs
toward the file size; lmzoo's loader maps the file afresh for each batch. For contrast the same
reads are made through one long-lived memmap (``naive``). One JSON line per loader::

    {"loader": "TokenLoader", "rss_mb": [...], "growth_mb": 0.4, "bound_mb": 64, "within": true, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from lmzoo.data import TokenLoader

BOUND_MB = 64  # the guarantee: RSS grows by less than this over the run, whatever the shard size
EVERY = 500


def write_shard(directory: Path, tokens: int, vocab: int = 50304, seed: int = 0) -> Path:
    """A data directory with ``tokens`` random uint16 ids in train.bin (val.bin small) and meta.json."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(directory / "train.bin", "wb") as f:
        left = tokens
        while left:
            n = min(left, 1 << 24)
            rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(f)
            left -= n
    rng.integers(0, vocab, size=1 << 16, dtype=np.uint16).tofile(directory / "val.bin")
    meta = {"format_version": 1, "tokenizer": "byte", "vocab_size": vocab, "eos_id": None, "dtype": "uint16",
            "train_tokens": tokens, "val_tokens": 1 << 16}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class NaiveLoader:
    """The failure for contrast: the same batches read through one memmap kept for the whole run."""

    def __init__(self, loader: TokenLoader):
        self.loader = loader
        self.data = np.memmap(loader.path, dtype=loader.dtype, mode="r", shape=(loader.num_tokens,))

    def next_batch(self) -> np.ndarray:
        span = self.loader.block_size + 1
        starts = self.loader._starts(self.loader.step)
        self.loader.step += 1
        return np.stack([np.array(self.data[s : s + span], dtype=np.int64) for s in starts])


def measure(data: Path, batches: int, batch_size: int, block_size: int, naive: bool = False) -> dict:
    """RSS every EVERY batches while drawing ``batches`` batches (after one warm-up batch)."""
    loader = TokenLoader(data, "train", block_size, batch_size, seed=0)
    source = NaiveLoader(loader) if naive else loader
    source.next_batch()  # warm-up: imports, allocator pools
    samples, t0 = [rss_mb()], time.time()
    for i in range(1, batches + 1):
        source.next_batch()
        if i % EVERY == 0:
            samples.append(rss_mb())
    growth = max(samples) - samples[0]
    return {
        "loader": "naive (one memmap)" if naive else "TokenLoader", "batches": batches, "batch_size": batch_size,
        "block_size": block_size, "shard_gb": round(loader.num_tokens * loader.dtype.itemsize / 1e9, 2),
        "rss_mb": [round(x, 1) for x in samples], "growth_mb": round(growth, 1), "bound_mb": BOUND_MB,
        "within": growth < BOUND_MB, "batches_per_s": round(batches / (time.time() - t0), 1),
        "load_avg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of train.bin in GB")
    ap.add_argument("--batches", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--no-naive", action="store_true", help="skip the long-lived-memmap contrast")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmzoo-loadermem-", dir=a.dir))
    try:
        data = write_shard(work / "data", int(a.gb * 1e9) // 2)
        print(json.dumps(measure(data, a.batches, a.batch_size, a.block_size)), flush=True)
        if not a.no_naive:
            print(json.dumps(measure(data, a.batches, a.batch_size, a.block_size, naive=True)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
