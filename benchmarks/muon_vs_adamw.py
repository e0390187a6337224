"""Muon vs AdamW (and AdEMAMix) at equal steps, each with a small lr sweep, on tiny Shakespeare
(char) or the built-in ``stdlib`` corpus with a BPE tokenizer.

Same model (gpt2-char-cpu's block), data order, schedule (cosine to lr/10, 10% warm-up) and step
count for every run; only the optimizer and its learning rate change. Prints one JSON line per run
(``--jsonl`` also appends them to a file) and the best val loss per optimizer. docs/muon.md holds the
measured tables.

    python benchmarks/muon_vs_adamw.py --steps 300
    python benchmarks/muon_vs_adamw.py --setting bpe --steps 300 --jsonl results/muon-bpe.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
LRS = {
    "shakespeare": {"adamw": [1e-3, 3e-3, 1e-2], "muon": [3e-3, 1e-2, 3e-2], "ademamix": [1e-3, 3e-3, 1e-2]},
    "bpe": {"adamw": [1e-3, 3e-3, 1e-2], "muon": [3e-3, 1e-2, 3e-2], "ademamix": [1e-3, 3e-3, 1e-2]},
}


def prepare_data(args: argparse.Namespace) -> Path:
    """Tokenize the setting's corpus once into ``<out>/data-<setting>`` (reused when present)."""
    d = Path(args.out) / f"data-{args.setting}"
    if (d / "meta.json").exists():
        return d
    if args.setting == "shakespeare":
        return prepare(args.input, d, tokenizer="char", progress=False)
    return prepare("stdlib", d, tokenizer="bpe", vocab_size=args.bpe_vocab, limit=args.bpe_docs, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=["shakespeare", "bpe"], default="shakespeare")
    ap.add_argument("--input", default=str(SHAKESPEARE), help="tiny Shakespeare text (setting shakespeare)")
    ap.add_argument("--bpe-vocab", type=int, default=2048)
    ap.add_argument("--bpe-docs", type=int, default=400, help="stdlib files used (the first N)")
    ap.add_argument("--out", default="runs/muon_vs_adamw")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    ap.add_argument("--lrs", type=float, nargs="+", help="learning rates for every optimizer (default: LRS)")
    ap.add_argument("--jsonl", help="also append each run's JSON line to this file")
    args = ap.parse_args()
    if args.setting == "shakespeare" and not Path(args.input).is_file():
        raise SystemExit(f"muon_vs_adamw: {args.input}: no such file")
    torch.set_num_threads(1)
    data = prepare_data(args)
    best: dict[str, tuple[float, float]] = {}
    for name in args.optimizers:
        for lr in args.lrs or LRS[args.setting][name]:
            cfg = TrainConfig(
                model="gpt2-char-cpu", data_dir=str(data), out_dir=f"{args.out}/{args.setting}-{name}-{lr:g}",
                max_steps=args.steps, eval_interval=0, eval_iters=20, batch_size=args.batch_size,
                block_size=args.block_size, lr=lr, min_lr=lr / 10, warmup_steps=args.steps // 10, progress=False,
                sample_tokens=0, threads=1, optimizer=name, keep_last=1,
            )
            t0, load0 = time.time(), os.getloadavg()[0]
            trainer = Trainer(cfg)
            summary = trainer.train()
            if summary["step"] < args.steps:  # stopped early (a signal): not a point of the comparison
                raise SystemExit(f"muon_vs_adamw: {name} lr {lr:g} stopped at step {summary['step']}")
            val = summary["val_loss"]
            row = {"benchmark": "muon_vs_adamw", "setting": args.setting, "optimizer": name, "lr": lr,
                   "steps": args.steps, "batch": [args.batch_size, args.block_size],
                   "params": trainer.model.num_params(), "val_loss": round(val, 4),
                   "wall_s": round(time.time() - t0, 1), "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                   "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                   "machine": f"{platform.machine()} x{os.cpu_count()}", "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:  # one line per finished run: appends are whole lines
                    f.write(json.dumps(row) + "\n")
            if name not in best or val < best[name][1]:
                best[name] = (lr, val)
    print(json.dumps({"best": {k: {"lr": v[0], "val_loss": round(v[1], 4)} for k, v in best.items()}}))


if __name__ == "__main__":
    main()
