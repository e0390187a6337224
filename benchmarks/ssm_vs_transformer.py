"""Tiny Mamba and tiny Jamba against a Transformer of the same size, same data, same budget, on CPU.

Each model trains with the shared trainer on the built-in ``stdlib`` corpus (byte tokens) for the
same number of steps and tokens, with the same optimizer and schedule; prints one JSON line per
model: parameters (total and active per token), wall time, tokens/s and the val loss (the
trainer's, and a lower-noise one over ``--eval-batches`` batches).

    python benchmarks/ssm_vs_transformer.py                    # 3 models x 1000 steps
    python benchmarks/ssm_vs_transformer.py --steps 200 --models mamba-char-cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.train import TrainConfig, Trainer

RECIPE = dict(  # nanoGPT's CPU recipe (benchmarks/cpu_shakespeare_char.py), on stdlib bytes
    batch_size=12, block_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
    weight_decay=0.1, grad_clip=1.0, eval_iters=20, device="cpu", dtype="float32", progress=False,
    sample_tokens=0,
)


def run(model: str, data_dir: Path, out: Path, steps: int, seed: int, eval_batches: int) -> dict:
    cfg = TrainConfig.from_dict({**RECIPE, "model": model, "max_steps": steps, "eval_interval": steps,
                                 "data_dir": str(data_dir), "out_dir": str(out / model), "seed": seed})
    trainer = Trainer(cfg)
    t0 = time.time()
    summary = trainer.train()
    wall = time.time() - t0
    m = trainer.model
    return {
        "bench": "ssm_vs_transformer", "model": model, "family": m.family, "params": m.num_params(),
        "active_params": m.active_params(), "steps": summary["step"],
        "tokens": summary["step"] * cfg.batch_size * cfg.block_size, "wall_s": round(wall, 1),
        "tokens_per_s": round(summary["step"] * cfg.batch_size * cfg.block_size / wall),
        "val_loss": round(summary["val_loss"], 4),
        f"val_loss_{eval_batches}": round(trainer.evaluate(eval_batches), 4),
        "seed": seed, "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["gpt2-char-cpu", "mamba-char-cpu", "jamba-char-cpu"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--eval-batches", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data_dir = work / "stdlib-byte"
        if not (data_dir / "meta.json").exists():
            prepare("stdlib", data_dir, tokenizer="byte")
        for model in args.models:
            row = run(model, data_dir, work, args.steps, args.seed, args.eval_batches)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
