"""RMSNorm vs LayerNorm, and SwiGLU vs GELU at equal parameters: the two Llama substitutions, measured.

1. ``norm``: forward + backward time of lmzoo's RMSNorm (written out, statistics in float32),
   LayerNorm (``F.layer_norm``, one fused kernel) and ``torch.nn.functional.rms_norm`` on
   (tokens, dim) float32 activations, and lmzoo RMSNorm's max abs difference from torch's.
2. ``mlp``: the same small GPT (4 layers, 128 wide, RoPE, RMSNorm) trained on character-level
   tiny Shakespeare with a GELU MLP (hidden 4d = 512) or a SwiGLU MLP of equal parameter count
   (hidden 341 ~ 2/3 * 4d), ``--seeds`` seeds each; the final validation loss over 50 batches.

    python benchmarks/rmsnorm_swiglu.py --input ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmzoo.data import prepare
from lmzoo.layers.norm import LayerNorm, RMSNorm
from lmzoo.train import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def norm_bench(tokens: int, dim: int, reps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, requires_grad=True)
    out = {}
    w = torch.ones(dim, requires_grad=True)
    fused = lambda t: F.rms_norm(t, (dim,), w, 1e-6)  # noqa: E731  torch's own kernel, for reference
    norms = (("rmsnorm", RMSNorm(dim)), ("layernorm", LayerNorm(dim, bias=True)), ("torch_rms_norm", fused))
    for name, layer in norms:
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            layer(x).square().mean().backward()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[f"{name}_fwd_bwd_ms"] = round(1000 * statistics.median(times), 3)
    rms = RMSNorm(dim)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
        diff = (rms(x) - F.rms_norm(x, (dim,), rms.weight, rms.eps)).abs().max().item()
    return {"bench": "rmsnorm_swiglu", "what": "norm", "tokens": tokens, "dim": dim, **out,
            "rmsnorm_vs_torch_max_abs_diff": diff}


def mlp_run(data: Path, out: Path, mlp: str, hidden: int, seed: int, steps: int) -> dict:
    cfg = TrainConfig.from_dict(dict(
        model="gpt2-improved-char-cpu", model_args={"mlp": mlp, "mlp_hidden": hidden, "norm": "rmsnorm"},
        data_dir=str(data), out_dir=str(out), batch_size=12, block_size=64, max_steps=steps,
        eval_interval=steps,
        eval_iters=50, warmup_steps=100, lr=1e-3, min_lr=1e-4, device="cpu", dtype="float32", progress=False,
        sample_tokens=0, seed=seed,
    ))
    trainer = Trainer(cfg)
    params = trainer.model.num_params()
    t0 = time.perf_counter()
    summary = trainer.train()
    return {"params": params, "val_loss": summary["val_loss"], "train_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(SHAKESPEARE))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "device": f"cpu ({os.cpu_count()} cores)",
           "threads": torch.get_num_threads()}
    print(json.dumps({**norm_bench(8 * 256, 1024, 20), **env}))
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(args.input, Path(tmp) / "data", tokenizer="char")
        for mlp, hidden in (("gelu", 512), ("swiglu", 341)):
            runs = [mlp_run(data, Path(tmp) / f"{mlp}-{s}", mlp, hidden, s, args.steps) for s in args.seeds]
            print(json.dumps({
                "bench": "rmsnorm_swiglu", "what": "mlp", "mlp": mlp, "mlp_hidden": hidden,
                "steps": args.steps,
                "params": runs[0]["params"], "seeds": args.seeds,
                "val_loss_per_seed": [round(r["val_loss"], 4) for r in runs],
                "val_loss_mean": round(statistics.mean(r["val_loss"] for r in runs), 4),
                "train_s_mean": round(statistics.mean(r["train_s"] for r in runs), 1), **env,
            }))


if __name__ == "__main__":
    main()
