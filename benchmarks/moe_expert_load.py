"""Expert load from a short training run: a small Mixtral on character-level tiny Shakespeare,
with the load-balancing loss (Mixtral's weight 0.02) and without it (weight 0).

Reads the trainer's metrics.jsonl, where every train record carries ``moe_tokens_per_expert``
(n_layer x n_experts, the last micro-batch of the step). Prints one JSON line per run: the load
histogram of each layer summed over the last ``--tail`` steps, as fractions of the assignments
(uniform = 1 / n_experts), its max/min ratio, the router entropy and the validation loss.

    python benchmarks/moe_expert_load.py --input ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.metrics import read_metrics

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SHAKESPEARE))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tail", type=int, default=50)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.02, 0.0], help="moe_aux_weight per run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(args.input, Path(tmp) / "data", tokenizer="char")
        for w in args.weights:
            out = Path(tmp) / f"run-{w}"
            cfg = TrainConfig.from_dict(dict(
                model="mixtral-char-cpu", model_args={"moe_aux_weight": w}, data_dir=str(data),
                out_dir=str(out),
                batch_size=12, block_size=64, max_steps=args.steps, eval_interval=args.steps, eval_iters=20,
                warmup_steps=50, lr=1e-3, min_lr=1e-4, device="cpu", dtype="float32", progress=False,
                sample_tokens=0, seed=1337,
            ))
            summary = Trainer(cfg).train()
            train = [r for r in read_metrics(out) if r["kind"] == "train"]
            last = train[-args.tail :]
            loads = torch.tensor([r["moe_tokens_per_expert"] for r in last], dtype=torch.float64)
            loads = loads.sum(0)  # (n_layer, n_experts)
            frac = loads / loads.sum(1, keepdim=True)
            print(json.dumps({
                "bench": "moe_expert_load", "model": "mixtral-char-cpu", "moe_aux_weight": w,
                "steps": args.steps,
                "device": f"cpu ({os.cpu_count()} cores)", "threads": torch.get_num_threads(),
                "load_fraction_per_layer": [[round(v, 3) for v in row] for row in frac.tolist()],
                "max_over_min_per_layer": [round(v, 2) for v in (frac.amax(1) / frac.amin(1)).tolist()],
                "first_step_load_fraction_layer0": [round(v / sum(train[0]["moe_tokens_per_expert"][0]), 3)
                                                    for v in train[0]["moe_tokens_per_expert"][0]],
                "router_entropy_first_last": [round(r["moe_entropy"], 3) for r in (train[0], train[-1])],
                "balance_loss_last": round(train[-1]["moe_balance"], 4),
                "val_loss": round(summary["val_loss"], 4),
            }))


if __name__ == "__main__":
    main()
