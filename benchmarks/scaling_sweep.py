"""A reduced scaling-law sweep on CPU: model sizes (the depth dial) x compute budgets (IsoFLOP) on
tiny Shakespeare (char), then the Hoffmann et al. approach-3 fit, the frontier and the plot.

Each run trains a GPT from :func:`lmzoo.evaluation.scaling.depth_config` for the number of steps that spends its
budget C = 6 N D (:func:`lmzoo.evaluation.scaling.isoflop_plan`), with a cosine schedule ending there
(:func:`lmzoo.evaluation.scaling.run_sweep`). Prints one JSON line per run (``--jsonl`` appends them to a file),
then the fit. ``--shard i/n`` runs every n-th run of the plan (largest first), so n processes share
the sweep; ``--from-log`` refits their files without training. docs/scaling-laws.md has the study.

    python benchmarks/scaling_sweep.py --flops 3e11 1e12 3e12 1e13 --depths 1 2 3 4 5 6 7 \\
        --shard 0/2 --jsonl results/scaling-isoflop.jsonl         # and --shard 1/2 beside it
    python benchmarks/scaling_sweep.py --from-log results/scaling-isoflop.jsonl
    python benchmarks/scaling_sweep.py --depths 1 2 3 --steps 40 80 160   # a plain grid, ~3 minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.evaluation.scaling import dial_params, fit_scaling_law, isoflop_plan, plot_fit, run_sweep

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def read_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        runs += [json.loads(ln) for ln in Path(p).read_text().splitlines() if ln.startswith('{"depth"')]
    return [r for r in runs if math.isfinite(r["val_loss"])]  # an interrupted run has no final loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(SHAKESPEARE))
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 80, 160], help="plain grid (without --flops)")
    ap.add_argument("--flops", type=float, nargs="+",
                    help="IsoFLOP budgets C = 6ND (replace --steps; with --from-log: the plot's budgets)")
    ap.add_argument("--min-steps", type=int, default=50)
    ap.add_argument("--max-tokens", type=float, default=5.6e6, help="IsoFLOP: leave out runs over this many tokens")
    ap.add_argument("--aspect", type=int, default=32)
    ap.add_argument("--head_dim", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--eval_iters", type=int, default=50)
    ap.add_argument("--shard", default="0/1", help="i/n: run only runs i, i+n, ... of the plan (largest first)")
    ap.add_argument("--jsonl", help="append each run's JSON line to this file")
    ap.add_argument("--plot", default="docs/figures/scaling-sweep.png")
    ap.add_argument("--e-range", type=float, nargs=2, metavar=("LO", "HI"), help="bound the fitted E")
    ap.add_argument("--bootstrap", type=int, default=0, help="refit on this many resamples of the runs")
    ap.add_argument("--fit-json", help="write the fit and frontier as JSON to this file")
    ap.add_argument("--from-log", nargs="+", help="fit and plot the JSON lines of previous runs (no training)")
    args = ap.parse_args()
    if args.from_log:
        runs = read_runs(args.from_log)
    else:
        torch.set_num_threads(1)
        data = Path(args.out) / "data"
        if not (data / "meta.json").exists():
            prepare(args.input, data, tokenizer="char", progress=False)
        vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
        plan = None
        if args.flops:
            params = {d: dial_params(d, vocab, args.block_size, args.aspect, args.head_dim) for d in args.depths}
            full = isoflop_plan(args.flops, params, args.batch_size * args.block_size, args.min_steps, args.max_tokens)
            full.sort(key=lambda r: -r["flops"])  # largest first: the shards finish together
            i, n = (int(x) for x in args.shard.split("/"))
            plan = [(r["depth"], r["steps"]) for r in full[i::n]]

        def log(run: dict) -> None:
            row = {**run, "val_loss": round(run["val_loss"], 4), "loadavg": round(os.getloadavg()[0], 2),
                   "batch": [args.batch_size, args.block_size], "aspect": args.aspect, "head_dim": args.head_dim,
                   "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                   "machine": f"{platform.machine()} x{os.cpu_count()}", "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:  # whole lines, one per finished run
                    f.write(json.dumps(row) + "\n")

        runs = run_sweep(args.input, args.out, args.depths, args.steps, args.aspect, args.head_dim, args.batch_size,
                         args.block_size, log=log, plan=plan, eval_iters=args.eval_iters, data_dir=str(data))
        if args.shard != "0/1":
            return  # a shard only trains; fit the shards' files together with --from-log
    ns, ds, ls = ([r[k] for r in runs] for k in ("params", "tokens", "val_loss"))
    t0 = time.time()
    e_range = tuple(args.e_range) if args.e_range else (None, None)
    fit = fit_scaling_law(ns, ds, ls, e_range=e_range)
    out = {**fit.summary(), "runs": len(runs), "fit_s": round(time.time() - t0, 1)}
    if args.bootstrap:  # refit on runs resampled with replacement: how well the sweep pins each constant
        rng = random.Random(0)
        keys = ("E", "A", "B", "alpha", "beta")
        samples: dict[str, list[float]] = {k: [] for k in (*keys, "a")}
        for _ in range(args.bootstrap):
            pick = [rng.randrange(len(runs)) for _ in runs]
            if len({(ns[i], ds[i]) for i in pick}) < 5:
                continue
            f = fit_scaling_law([ns[i] for i in pick], [ds[i] for i in pick], [ls[i] for i in pick], e_range=e_range)
            for k in keys:
                samples[k].append(getattr(f, k))
            samples["a"].append(f.beta / (f.alpha + f.beta))
        out["bootstrap"] = {k: {"p10": sorted(v)[len(v) // 10], "median": sorted(v)[len(v) // 2],
                                "p90": sorted(v)[(9 * len(v)) // 10]} for k, v in samples.items() if v}
        out["bootstrap_n"] = len(samples["E"])
    print(json.dumps(out), flush=True)
    if args.fit_json:
        tmp = Path(args.fit_json + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.fit_json)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_fit(fit, ns, ds, ls, args.plot, budgets=args.flops)
    print(json.dumps({"plot": args.plot}))


if __name__ == "__main__":
    main()
