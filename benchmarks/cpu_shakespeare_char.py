"""nanoGPT's CPU recipe on character-level tiny Shakespeare, trained by lmzoo.

The recipe (nanoGPT README, "I only have a macbook"): 4 layers, 4 heads, 128 wide, block 64,
batch 12, 2000 iterations, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas
(0.9, 0.99), weight decay 0.1, dropout 0, grad clip 1.0, eval every 250 iterations on 20 batches.

    python benchmarks/cpu_shakespeare_char.py --input ../shared/data/tinyshakespeare.txt

prints one JSON line: wall seconds of the training run (evaluations included, data preparation
excluded), tokens/s, the final val loss as the trainer measures it (20 batches) and a
lower-noise val loss over 200 batches.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def run(input_path: Path, work: Path, seed: int, **overrides) -> dict:
    data_dir = work / "data"
    if not (data_dir / "meta.json").exists():
        prepare(str(input_path), data_dir, tokenizer="char")
    cfg = TrainConfig.from_dict({**NANOGPT_CPU, **overrides, "data_dir": str(data_dir),
                                 "out_dir": str(work / f"run-{seed}"), "seed": seed})
    trainer = Trainer(cfg)
    t0 = time.time()
    summary = trainer.train()
    wall = time.time() - t0
    return {
        "benchmark": "cpu_shakespeare_char",
        "model": cfg.model,
        "model_args": cfg.model_args,
        "params": trainer.model.num_params(),
        "steps": summary["step"],
        "wall_s": round(wall, 1),
        "tokens_per_s": round(summary["step"] * cfg.batch_size * cfg.block_size / wall),
        "val_loss": round(summary["val_loss"], 4),
        "val_loss_200": round(trainer.evaluate(iters=200), 4),
        "seed": seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="tiny Shakespeare text file")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--model", default="gpt2-char-cpu")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = p.parse_args()
    if not args.input.is_file():
        raise SystemExit(f"cpu_shakespeare_char: {args.input}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        print(json.dumps(run(args.input, work, args.seed, model=args.model)), flush=True)


if __name__ == "__main__":
    main()
