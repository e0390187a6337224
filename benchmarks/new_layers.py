"""BitNet and KAN against the full-precision GELU MLP model, at equal training budget on tiny Shakespeare.

Every run trains the same recipe (the CPU char-level GPT: 4 layers, 4 heads, 128 wide, context 64,
batch 12, AdamW lr 1e-3 cosine to 1e-4) for the same number of steps and data, then measures the
val loss on 100 batches. Runs:

- ``fp``: the baseline (GELU MLP, float32 weights);
- ``bitnet-b1.58`` / ``bitnet-b1``: the same model with every attention and MLP projection rewritten
  by ``lmzoo.quant.bitnet.convert`` (embeddings and head full precision); the val loss is measured on
  the packed 2-bit model, and the weight memory of the replaced layers is reported;
- ``kan``: ``mlp="kan"``, whose hidden width (51) gives the KAN feed-forward the MLP's parameter count.

    python benchmarks/new_layers.py --input ../shared/data/tinyshakespeare.txt --steps 600

One JSON line per run, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import lmzoo
from lmzoo.data import prepare
from lmzoo.quant import bitnet
from lmzoo.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"  # the lmzoo workspace
RECIPE = dict(
    model="gpt2-char-cpu", batch_size=12, block_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=50, beta1=0.9,
    beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_iters=20, device="cpu", dtype="float32", progress=False,
    sample_tokens=0,
)
RUNS = {
    "fp": dict(model_args={}),
    "bitnet-b1.58": dict(model_args={}, bitnet="b1.58"),
    "bitnet-b1": dict(model_args={}, bitnet="b1"),
    "kan": dict(model_args={"mlp": "kan"}),
}


def run(name: str, spec: dict, data_dir: Path, work: Path, steps: int, seed: int, threads: int) -> dict:
    cfg = TrainConfig.from_dict({
        **RECIPE, "model_args": spec["model_args"], "data_dir": str(data_dir), "out_dir": str(work / name),
        "max_steps": steps, "eval_interval": steps, "seed": seed, "threads": threads,
    })
    model = None
    if spec.get("bitnet"):
        torch.manual_seed(seed)
        model = bitnet.convert(lmzoo.build(cfg.model, vocab_size=65, **spec["model_args"]), variant=spec["bitnet"])
    trainer = Trainer(cfg, model=model)
    t0 = time.time()
    summary = trainer.train()
    wall = time.time() - t0
    rec = {
        "bench": "new_layers", "run": name, "params": trainer.model.num_params(), "steps": summary["step"],
        "tokens": summary["tokens"], "wall_s": round(wall, 1),
        "tokens_per_s": round(summary["tokens"] / wall), "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    if spec.get("bitnet"):
        rec["val_loss_latent"] = round(trainer.evaluate(iters=100), 4)
        bitnet.pack(trainer.model)  # inference form: what the val loss below is measured on
        rep = bitnet.memory_report(trainer.model)
        rec.update(weight_bytes_bf16=rep["bf16_bytes"], weight_bytes_packed=rep["packed_bytes"],
                   packed_over_bf16=round(rep["ratio"], 4), model_bytes_bf16=rep["model_bf16_bytes"],
                   model_bytes_packed=rep["model_packed_bytes"])
    rec["val_loss"] = round(trainer.evaluate(iters=100), 4)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=SHAKESPEARE, help="tiny Shakespeare text file")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = prepare(str(args.input), work / "data", tokenizer="char", progress=False)
        results = {}
        for name in args.runs.split(","):
            results[name] = rec = run(name, RUNS[name], data_dir, work, args.steps, args.seed, args.threads)
            rec.update(torch=torch.__version__, threads=args.threads, seed=args.seed)
            print(json.dumps(rec), flush=True)
    base = results.get("fp", {}).get("val_loss")
    print(json.dumps({
        "bench": "new_layers", "what": "summary", "steps": args.steps,
        **{f"val_loss_{k}": v["val_loss"] for k, v in results.items()},
        **({f"delta_{k}": round(v["val_loss"] - base, 4) for k, v in results.items() if k != "fp"} if base else {}),
        **{f"params_{k}": v["params"] for k, v in results.items()},
    }))


if __name__ == "__main__":
    main()
