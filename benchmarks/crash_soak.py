"""Crash soak: kill -9 a training run at random moments, resume it each time, compare bit for bit.

    python benchmarks/crash_soak.py [--kills 20] [--steps 300] [--seed 0] [--work DIR]

A tiny model (gpt2-debug, char tokenizer, CPU, one thread, dropout on so the RNG state matters)
checkpoints after every step. An uninterrupted reference run keeps all its checkpoints. The same
run is then started with ``--resume`` and SIGKILLed at ``--kills`` seeded random moments: a fifth
of them during start-up (imports, resume, the first writes), the rest after the run has written a
new checkpoint, at a uniform delay that lands in steps, evaluations, checkpoint writes and prunes.

After every kill the run directory is checked: ``lmzoo.load`` reads the newest checkpoint (or,
before the first one, refuses with a CheckpointError), and every visible checkpoint in it holds
exactly the reference run's weights and step at its step: never half written, never silently
wrong. A kill survived = that check passed. At the end the run is resumed to completion and its
final weights and optimizer state must equal the reference's bit for bit. One JSON line::

    {"kills_survived": 20, "kills_tried": 20, "bit_identical": true, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lmzoo
from lmzoo.data import prepare
from lmzoo.errors import CheckpointError
from lmzoo.formats import checkpoint as ckpt

TEXT = "".join(f"{w} the quick brown fox {i} jumps over the lazy dog.\n" for i, w in enumerate(["a", "b", "c"] * 400))


def train_args(data: Path, out: Path, steps: int, keep_last: int) -> list[str]:
    return [
        sys.executable, "-m", "lmzoo", "train", f"--data_dir={data}", f"--out_dir={out}", "--model=gpt2-debug",
        "--model.block_size=32", "--model.dropout=0.1", f"--max_steps={steps}", "--batch_size=4", "--block_size=32",
        "--eval_interval=25", "--eval_iters=2", "--ckpt_interval=1", f"--keep_last={keep_last}", "--lr=3e-3",
        "--warmup_steps=5", "--progress=false", "--sample_tokens=0", "--device=cpu", "--threads=1", "--seed=0",
        "--resume",
    ]


def _latest(out: Path) -> str:
    f = out / ckpt.LATEST
    try:
        return f.read_text().strip()
    except OSError:
        return ""


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_train_state(a: dict, b: dict) -> bool:
    """Optimizer moments, loader position, step and RNG states equal (bit for bit)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    skip = ("train_time_s", "train_config")  # wall time; the config string holds nothing resumable
    keys = [k for k in flat_a if not k.startswith(skip)]
    if set(keys) != {k for k in flat_b if not k.startswith(skip)}:
        return False
    for k in keys:
        x, y = flat_a[k], flat_b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix: obj}


def check_run_dir(out: Path, ref: Path) -> tuple[bool, str]:
    """(ok, what): the newest checkpoint loads and every visible checkpoint equals the reference's."""
    try:
        model = lmzoo.load(out)
    except CheckpointError as e:  # a clean refusal is fine only when no checkpoint was ever completed
        done = list(out.glob("ckpt-*")) if out.is_dir() else []
        return (not done and not _latest(out)), f"refused: {e}"
    except Exception as e:
        return False, f"lmzoo.load crashed ({type(e).__name__}: {str(e)[:120]})"
    newest = ckpt.resolve(out)
    if not _same(ckpt.model_state(model), load_file(str(ref / newest.name / ckpt.WEIGHTS))):
        return False, f"{newest.name} loads other weights than the reference's"
    for d in sorted(out.glob("ckpt-*")):
        try:
            state = ckpt.load_train_state(d)
            weights = load_file(str(d / ckpt.WEIGHTS))
        except Exception as e:  # a half-written or half-deleted checkpoint that looks like one
            return False, f"{d.name} is visible but unreadable ({type(e).__name__}: {str(e)[:120]})"
        if f"ckpt-{state['step']:08d}" != d.name or not _same(weights, load_file(str(ref / d.name / ckpt.WEIGHTS))):
            return False, f"{d.name} differs from the reference"
    if (out / "best").is_dir():  # rewritten in place at evaluations: always whole, always the right step's
        try:
            step = ckpt.read_config(out / "best")[2]["lmzoo"]["step"]
            best = ckpt.model_state(lmzoo.load(out / "best"))
        except Exception as e:
            return False, f"best/ is unreadable ({type(e).__name__}: {str(e)[:120]})"
        if not _same(best, load_file(str(ref / f"ckpt-{step:08d}" / ckpt.WEIGHTS))):
            return False, "best/ differs from the reference at its step"
    return True, f"newest {newest.name}"


def soak(work: Path, kills: int = 20, steps: int = 300, seed: int = 0, window: float = 1.0, log=print) -> dict:
    """Run the soak in ``work`` (created); returns the report dict. ``window``: the longest delay (s)
    between a session's first new checkpoint and its kill."""
    t_start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    (work / "corpus.txt").write_text(TEXT)
    data = prepare(str(work / "corpus.txt"), work / "data", tokenizer="char", progress=False)
    ref, out = work / "ref", work / "run"
    for d in (ref, out):
        shutil.rmtree(d, ignore_errors=True)
    r = subprocess.run(train_args(data, ref, steps, keep_last=steps + 1), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"reference run failed: {r.stderr[-2000:]}")
    args = train_args(data, out, steps, keep_last=2)
    rng = random.Random(seed)
    tried = survived = 0
    failures: list[str] = []
    for i in range(kills):
        before = _latest(out)
        err = work / f"attempt-{i + 1}.stderr"
        with open(err, "wb") as f:
            p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f)
        if rng.random() < 0.2:  # during start-up: imports, resume, train_config.json, cleaning
            moment = "startup"
            time.sleep(rng.uniform(0.0, 3.0))
        else:  # while training: after this session's first checkpoint, at a random delay
            moment = "training"
            deadline = time.time() + 120
            while _latest(out) == before and p.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, window))
        if p.poll() is not None:  # finished before the kill (too few steps for this many kills) or failed
            tail = err.read_text(errors="replace").strip().splitlines()[-1:]
            if p.returncode != 0:
                failures.append(f"attempt {i + 1} failed by itself with code {p.returncode}: {tail}")
            log(f"kill {i + 1}: the run exited by itself (code {p.returncode}, {tail}); raise --steps if 0")
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        tried += 1
        ok, what = check_run_dir(out, ref)
        survived += ok
        if not ok:
            failures.append(f"kill {i + 1}: {what}")
        log(f"kill {i + 1} ({moment}): {'ok' if ok else 'FAILED'}, {what}")
    r = subprocess.run(args, capture_output=True, text=True)
    final = ckpt.resolve(out) if r.returncode == 0 else None
    identical = False
    if final is not None and final.name == ckpt.resolve(ref).name:
        identical = _same(load_file(str(final / ckpt.WEIGHTS)), load_file(str(ref / final.name / ckpt.WEIGHTS)))
        identical = identical and _same_train_state(ckpt.load_train_state(final), ckpt.load_train_state(
            ref / final.name))
    if r.returncode != 0:
        failures.append(f"final resume failed: {r.stderr.strip().splitlines()[-1:]}")
    return {
        "kills_survived": survived, "kills_tried": tried, "bit_identical": identical, "steps": steps,
        "final": final.name if final else None, "failures": failures,
        "stale_temp_dirs": len(list(out.glob(".*.tmp"))), "wall_s": round(time.time() - t_start, 1),
        "load_avg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="lmzoo-soak-"))
    try:
        report = soak(work, a.kills, a.steps, a.seed, log=lambda m: print(m, file=sys.stderr))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
