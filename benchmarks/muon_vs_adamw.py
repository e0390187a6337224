"""Muon vs AdamW (and AdEMAMix) at equal steps on tiny Shakespeare (char), each with a small lr sweep.

Same model (gpt2-char-cpu), data order, schedule (cosine, 10% warm-up) and step count for every
run; only the optimizer and its learning rate change. Prints one JSON line per run and the best
val loss per optimizer. docs/muon.md holds the measured table.

    python benchmarks/muon_vs_adamw.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmzoo.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
LRS = {"adamw": [1e-3, 3e-3], "muon": [3e-3, 1e-2], "ademamix": [1e-3, 3e-3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(SHAKESPEARE))
    ap.add_argument("--out", default="runs/muon_vs_adamw")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    ap.add_argument("--lrs", type=float, nargs="+", help="learning rates for every optimizer (default: LRS)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    best: dict[str, tuple[float, float]] = {}
    for name in args.optimizers:
        for lr in args.lrs or LRS[name]:
            cfg = TrainConfig(
                model="gpt2-char-cpu", source=args.input, tokenizer="char", data_dir=f"{args.out}/data",
                out_dir=f"{args.out}/{name}-{lr:g}", max_steps=args.steps, eval_interval=0, eval_iters=20,
                batch_size=12, lr=lr, min_lr=lr / 10, warmup_steps=args.steps // 10, progress=False, sample_tokens=0,
                threads=1, optimizer=name, keep_last=1,
            )
            t0 = time.time()
            val = Trainer(cfg).train()["val_loss"]
            print(json.dumps({"optimizer": name, "lr": lr, "steps": args.steps, "val_loss": round(val, 4),
                              "wall_s": round(time.time() - t0, 1), "loadavg": os.getloadavg()[0]}), flush=True)
            if name not in best or val < best[name][1]:
                best[name] = (lr, val)
    print(json.dumps({"best": {k: {"lr": v[0], "val_loss": round(v[1], 4)} for k, v in best.items()}}))


if __name__ == "__main__":
    main()
