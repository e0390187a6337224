"""nanoGPT's CPU recipe on character-level tiny Shakespeare, trained by lmzoo and, side by side, by nanoGPT.

The recipe (nanoGPT README, "I only have a macbook"): 4 layers, 4 heads, 128 wide, block 64,
batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas
(0.9, 0.99), weight decay 0.1, dropout 0, grad clip 1.0, eval every 250 iterations on 20 batches.

    python benchmarks/cpu_shakespeare_char.py --input ../shared/data/tinyshakespeare.txt
    python benchmarks/cpu_shakespeare_char.py --input ../shared/data/tinyshakespeare.txt --nanogpt ~/nanoGPT

Alone, it trains lmzoo once and prints one JSON line: wall seconds of the training run (evaluations
included, data preparation excluded), tokens/s, the final val loss as the trainer measures it (20
batches) and a lower-noise val loss over 200 batches.

With ``--nanogpt DIR`` (your own clone of github.com/karpathy/nanoGPT; lmzoo holds none of its code), both
systems train on the same text and machine, interleaved (nanoGPT, lmzoo, nanoGPT, lmzoo, ... for
``--rounds``), each in a fresh process: nanoGPT as its README runs it on a CPU::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

in a copy of DIR whose ``data/shakespeare_char/input.txt`` is ``--input`` (so its prepare.py reads it
instead of downloading), and lmzoo as this script's single run. Each prints one JSON line (process wall
time from start to exit, startup and evaluations included; the val loss after the last step, 20 batches
each), and a summary line gives the medians and the wall-time ratio lmzoo / nanoGPT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.train import TrainConfig, Trainer

NANOGPT_CPU = dict(
    model="gpt2-char-cpu",
    batch_size=12,
    block_size=64,
    max_steps=2000,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    beta1=0.9,
    beta2=0.99,
    weight_decay=0.1,
    decay_embeddings=True,  # nanoGPT decays every 2-D tensor, embeddings included
    grad_clip=1.0,
    eval_interval=250,
    eval_iters=20,
    device="cpu",
    dtype="float32",
    progress=False,
    sample_tokens=0,
)

# nanoGPT's CPU command line (its README), the step count filled in
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py")
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def run(input_path: Path, work: Path, seed: int, val_200: bool = True, **overrides) -> dict:
    """Train lmzoo once with the recipe (``overrides`` on top); the JSON record of the run."""
    data_dir = work / "data"
    if not (data_dir / "meta.json").exists():
        prepare(str(input_path), data_dir, tokenizer="char", progress=False)
    cfg = TrainConfig.from_dict({**NANOGPT_CPU, **overrides, "data_dir": str(data_dir),
                                 "out_dir": str(work / f"run-{seed}"), "seed": seed})
    trainer = Trainer(cfg)
    t0 = time.time()
    summary = trainer.train()
    wall = time.time() - t0
    return {
        "benchmark": "cpu_shakespeare_char",
        "system": "lmzoo",
        "model": cfg.model,
        "params": trainer.model.num_params(),
        "steps": summary["step"],
        "wall_s": round(wall, 1),
        "tokens_per_s": round(summary["step"] * cfg.batch_size * cfg.block_size / wall),
        "val_loss": round(summary["val_loss"], 4),
        **({"val_loss_200": round(trainer.evaluate(iters=200), 4)} if val_200 else {}),
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def check_nanogpt(directory: Path) -> None:
    missing = [f for f in NANOGPT_FILES if not (directory / f).is_file()]
    if missing:
        raise SystemExit(f"cpu_shakespeare_char: {directory} is not a nanoGPT checkout (no {', '.join(missing)})")


def nanogpt_copy(directory: Path, input_path: Path, work: Path) -> Path:
    """A copy of the checkout (without .git and outputs) whose shakespeare_char data is prepared from
    ``input_path``: its prepare.py downloads only when input.txt is missing. The user's DIR is not written."""
    dst = work / "nanogpt"
    shutil.copytree(directory, dst, ignore=shutil.ignore_patterns(".git", "out*", "*.bin", "*.pkl", "input.txt"))
    data = dst / "data" / "shakespeare_char"
    shutil.copyfile(input_path, data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, stdout=subprocess.DEVNULL)
    return dst


def git_commit(directory: Path) -> str | None:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True, text=True)
    return res.stdout.strip() or None


def nanogpt_files(directory: Path) -> dict[str, str]:
    """sha256 of each nanoGPT file the recipe runs: which code was measured, git checkout or not."""
    return {f: hashlib.sha256((directory / f).read_bytes()).hexdigest() for f in NANOGPT_FILES}


def run_nanogpt(copy: Path, steps: int, round_: int) -> dict:
    """nanoGPT's CPU recipe in a fresh process; its final evaluation parsed from what it prints."""
    # nanoGPT evaluates every eval_interval (250) steps only: a quick check's last step must be one of them
    every = [] if steps % 250 == 0 else [f"--eval_interval={steps}"]
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={steps}", f"--lr_decay_iters={steps}",
           *every, f"--out_dir=out-{round_}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=copy, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"cpu_shakespeare_char: nanoGPT's train.py failed ({res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-1:]}")
    evals = [(int(s), float(t), float(v)) for s, t, v in EVAL_LINE.findall(res.stdout)]
    if not evals:
        raise SystemExit("cpu_shakespeare_char: nanoGPT printed no 'step N: train loss ..., val loss ...' line")
    step, _, val = evals[-1]
    return {"benchmark": "cpu_shakespeare_char", "system": "nanogpt", "round": round_, "steps": step,
            "wall_s": round(wall, 1), "val_loss": round(val, 4), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def run_lmzoo_process(input_path: Path, work: Path, seed: int, steps: int, round_: int) -> dict:
    """This script's single lmzoo run in a fresh process, timed like nanoGPT's (start to exit)."""
    cmd = [sys.executable, __file__, "--input", str(input_path), "--work", str(work / f"lmzoo-{round_}"),
           "--seed", str(seed), "--max-steps", str(steps), "--no-val-200"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"cpu_shakespeare_char: the lmzoo run failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    return {**rec, "round": round_, "train_wall_s": rec["wall_s"], "wall_s": round(wall, 1),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def side_by_side(input_path: Path, nanogpt: Path, work: Path, seed: int, steps: int, rounds: int, emit) -> dict:
    """nanoGPT and lmzoo, interleaved ``rounds`` times; each run emitted as it ends; returns the summary."""
    copy = nanogpt_copy(nanogpt, input_path, work)
    prepare(str(input_path), work / f"lmzoo-{0}" / "data", tokenizer="char", progress=False)
    for r in range(1, rounds):  # the same prepared data for every lmzoo round (preparation is not timed)
        shutil.copytree(work / "lmzoo-0" / "data", work / f"lmzoo-{r}" / "data")
    runs: dict[str, list[dict]] = {"nanogpt": [], "lmzoo": []}
    for r in range(rounds):
        for system in ("nanogpt", "lmzoo"):
            rec = run_nanogpt(copy, steps, r) if system == "nanogpt" else run_lmzoo_process(
                input_path, work, seed, steps, r)
            runs[system].append(rec)
            emit(rec)
    wall = {s: [x["wall_s"] for x in runs[s]] for s in runs}
    val = {s: [x["val_loss"] for x in runs[s]] for s in runs}
    return {"benchmark": "cpu_shakespeare_char", "summary": "nanogpt_vs_lmzoo", "steps": steps, "rounds": rounds,
            "nanogpt_commit": git_commit(nanogpt), "nanogpt_files_sha256": nanogpt_files(nanogpt),
            "nanogpt_wall_s": wall["nanogpt"], "lmzoo_wall_s": wall["lmzoo"],
            "nanogpt_val_loss": val["nanogpt"], "lmzoo_val_loss": val["lmzoo"],
            "nanogpt_wall_median_s": statistics.median(wall["nanogpt"]),
            "lmzoo_wall_median_s": statistics.median(wall["lmzoo"]),
            "wall_ratio_lmzoo_over_nanogpt": round(statistics.median(wall["lmzoo"])
                                                   / statistics.median(wall["nanogpt"]), 3),
            "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="tiny Shakespeare text file")
    p.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout to run side by side")
    p.add_argument("--rounds", type=int, default=2, help="with --nanogpt: runs of each system, interleaved")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--model", default="gpt2-char-cpu")
    p.add_argument("--max-steps", type=int, default=NANOGPT_CPU["max_steps"], help="(a quick check: fewer steps)")
    p.add_argument("--no-val-200", dest="val_200", action="store_false", help="skip the 200-batch val loss")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = p.parse_args()
    if not args.input.is_file():
        raise SystemExit(f"cpu_shakespeare_char: {args.input}: no such file")
    emit = lambda rec: print(json.dumps(rec), flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.nanogpt is None:
            print("cpu_shakespeare_char: no --nanogpt DIR given: running lmzoo alone", file=sys.stderr)
            overrides = {"model": args.model, "max_steps": args.max_steps}
            emit(run(args.input, work, args.seed, val_200=args.val_200, **overrides))
            return
        check_nanogpt(args.nanogpt)
        emit(side_by_side(args.input, args.nanogpt.resolve(), work, args.seed, args.max_steps, args.rounds, emit))


if __name__ == "__main__":
    main()
