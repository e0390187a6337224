"""A reduced scaling-law sweep on CPU: model sizes (the depth dial) x token budgets on tiny
Shakespeare (char), then the Hoffmann et al. approach-3 fit, the frontier and the plot.

Each run trains a GPT from :func:`lmzoo.scaling.depth_config` for a number of steps that sets its
token budget, with a cosine schedule ending at that budget (:func:`lmzoo.scaling.run_sweep`).
Prints one JSON line per run, then the fit. Tiny sizes: the numbers show the procedure works, not
exponents to carry to real models (docs/scaling-laws.md).

    python benchmarks/scaling_sweep.py --out runs/scaling                # ~3 minutes on 2 busy cores
    python benchmarks/scaling_sweep.py --depths 1 2 3 4 --steps 50 100 200 400
    python benchmarks/scaling_sweep.py --from-log sweep.log               # refit printed runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmzoo.scaling import fit_scaling_law, plot_fit, run_sweep

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(SHAKESPEARE))
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 80, 160])
    ap.add_argument("--aspect", type=int, default=32)
    ap.add_argument("--head_dim", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--plot", default="docs/figures/scaling-sweep.png")
    ap.add_argument("--from-log", help="fit and plot the JSON lines a previous run printed (no training)")
    args = ap.parse_args()
    if args.from_log:
        runs = [json.loads(ln) for ln in Path(args.from_log).read_text().splitlines() if ln.startswith('{"depth"')]
    else:
        torch.set_num_threads(1)

        def log(run: dict) -> None:
            print(json.dumps({**run, "val_loss": round(run["val_loss"], 4), "loadavg": os.getloadavg()[0]}), flush=True)

        runs = run_sweep(args.input, args.out, args.depths, args.steps, args.aspect, args.head_dim, args.batch_size,
                         args.block_size, log=log)
    ns, ds, ls = ([r[k] for r in runs] for k in ("params", "tokens", "val_loss"))
    t0 = time.time()
    fit = fit_scaling_law(ns, ds, ls)
    n_opt, d_opt = fit.optimal(1e15)
    print(json.dumps({"fit": {k: round(v, 4) for k, v in vars(fit).items()},
                      "at_1e15_flops": {"params": float(n_opt), "tokens": float(d_opt)},
                      "fit_s": round(time.time() - t0, 1)}), flush=True)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_fit(fit, ns, ds, ls, args.plot)
    print(json.dumps({"plot": args.plot}))


if __name__ == "__main__":
    main()
