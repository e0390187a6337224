"""Peak resident memory of ``lmzoo prepare`` on generated text inputs of growing size.

    python benchmarks/prepare_memory.py [--sizes-mb 500,2000] [--tokenizers byte,char,bpe] [--dir /tmp]

For each size a text file of random words (a few thousand distinct ones, lines of 5-15 words) is
generated in ``--dir``, ``lmzoo prepare`` runs on it in a child process, and the resident memory of
the child and all its worker processes, summed, is sampled every 50 ms (psutil). The input and the
output are deleted afterwards. One JSON line per (size, tokenizer)::

    {"input_mb": 2000, "tokenizer": "byte", "peak_rss_mb": 610.2, "bound_mb": 1024, "within": true, ...}

``peak_rss_mb`` is the peak of the RSS summed over the process tree (the bound is checked on it:
it counts pages shared by the forked workers once per process, so it overstates), ``peak_pss_mb``
the same with shared pages split between their sharers, ``peak_single_mb`` the largest single
process (what ``getrusage(RUSAGE_CHILDREN)`` would report). The bound is fixed, not a function of
the input size: prepare streams pieces of a few MB through a bounded window of worker tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

BOUND_MB = 1024  # the guarantee: lmzoo prepare stays under this whatever the input size


def write_text(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """A file of about ``size_bytes`` of random lowercase words, made from one 8 MB block reshuffled."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = [bytes(rng.choice(letters, size=rng.integers(2, 10))).decode() for _ in range(5000)]
    lines, size = [], 0
    while size < 8 << 20:
        lines.append(" ".join(words[i] for i in rng.integers(0, len(words), size=rng.integers(5, 16))) + ".\n")
        size += len(lines[-1])
    block = np.array(lines, dtype=object)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            text = "".join(block[rng.permutation(len(block))])[: size_bytes - written]
            f.write(text)
            written += len(text)
    return path


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, largest RSS) in bytes over ``proc`` and its descendants.

    Forked workers share the parent's pages, which RSS counts once in every process: the RSS sum
    overstates, the PSS sum (each shared page split between its sharers) is what the tree really holds.
    """
    rss = pss = largest = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss, pss, largest = rss + info.rss, pss + getattr(info, "pss", info.rss), max(largest, info.rss)
    return rss, pss, largest


def run_measured(cmd: list[str], interval: float = 0.05) -> dict:
    """Run ``cmd``, sampling its process tree's memory; returns peaks (MB), time and exit code."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    peaks = [0, 0, 0]
    while p.poll() is None:
        peaks = [max(a, b) for a, b in zip(peaks, tree_memory(proc))]
        time.sleep(interval)
    err = p.stderr.read() if p.stderr else ""
    mb = [round(x / 2**20, 1) for x in peaks]
    return {"rc": p.returncode, "peak_rss_mb": mb[0], "peak_pss_mb": mb[1], "peak_single_mb": mb[2],
            "wall_s": round(time.time() - t0, 1), "stderr": err.strip().splitlines()[-1:] if p.returncode else []}


def prepare_cmd(text: Path, out: Path, tokenizer: str, workers: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "lmzoo", "prepare", str(text), "--out", str(out), "--tokenizer", tokenizer]
    if tokenizer == "bpe":
        cmd += ["--vocab-size", "4096"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


def measure(text: Path, tokenizer: str, work: Path, workers: int | None = None) -> dict:
    out = work / f"prepared-{tokenizer}"
    try:
        r = run_measured(prepare_cmd(text, out, tokenizer, workers))
        meta = json.loads((out / "meta.json").read_text()) if r["rc"] == 0 else {}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "input_mb": round(text.stat().st_size / 1e6), "tokenizer": tokenizer, **r, "bound_mb": BOUND_MB,
        "within": r["rc"] == 0 and r["peak_rss_mb"] < BOUND_MB,
        "tokens": meta.get("train_tokens", 0) + meta.get("val_tokens", 0), "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="500,2000")
    ap.add_argument("--tokenizers", default="byte,char")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: prepare's own)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmzoo-prepmem-", dir=a.dir))
    try:
        for size in (int(s) for s in a.sizes_mb.split(",")):
            text = write_text(work / f"input-{size}mb.txt", size * 10**6)
            for tok in a.tokenizers.split(","):
                print(json.dumps(measure(text, tok, work, a.workers)), flush=True)
            text.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
