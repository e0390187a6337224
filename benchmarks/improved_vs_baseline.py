"""nanoGPT's GPT-2 CPU recipe against lmzoo's improved recipe, at equal tokens and equal wall time.

Per setting, three runs on the same text:

1. ``baseline``: nanoGPT's CPU recipe (preset ``gpt2-char-cpu``: learned positions, GELU,
   LayerNorm, biases; 2000 steps of 12 x 64 tokens, lr 1e-3, cosine to 1e-4). Its token count and
   its wall time (evaluations included) are the two budgets.
2. ``improved@tokens``: the improved recipe for the same number of tokens.
3. ``improved@time``: the improved recipe for the same wall time (``max_time_s``; the learning
   rate decays over the time budget, ``schedule_unit=time``; the final evaluation is inside it).
   On a machine shared with other jobs, ``--clock cpu`` makes the budget the baseline's CPU time
   (``time_clock=cpu``): with one thread that is the wall time a quiet machine would take, and
   other jobs cannot shift it between the two runs.

Settings: ``shakespeare`` (character-level tiny Shakespeare, nanoGPT's "I only have a macbook"
setting) and ``bpe`` (the built-in ``stdlib`` corpus, the first ``--bpe-docs`` files, with a
2048-token BPE). Each run prints one JSON line; a Markdown table follows.

    python benchmarks/improved_vs_baseline.py --input ../shared/data/tinyshakespeare.txt

Val loss is the trainer's (20 fixed batches, what nanoGPT prints) and ``val_loss_200`` over 200
batches. Wall-clock figures depend on the machine's load: the script records ``os.getloadavg()``
and each run's CPU time. ``--table results.jsonl`` prints the table of saved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.train import TrainConfig, Trainer

# nanoGPT's CPU recipe (README, "I only have a macbook"), as in benchmarks/cpu_shakespeare_char.py
BASELINE = dict(
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
    decay_embeddings=True,
    grad_clip=1.0,
    eval_interval=250,
    eval_iters=20,
    device="cpu",
    dtype="float32",
    progress=False,
    sample_tokens=0,
    keep_last=1,
)
# lmzoo's improved recipe: preset gpt2-improved-char-cpu (RoPE, GQA 4:2, no biases, RMSNorm, SwiGLU) and
# a 3x higher peak learning rate; everything else is nanoGPT's (docs/improved-gpt2.md has the ablation).
IMPROVED = dict(BASELINE, model="gpt2-improved-char-cpu", lr=3e-3)
IMPROVED_MODEL_ARGS: dict = {}


def prepare_setting(setting: str, args: argparse.Namespace, work: Path) -> Path:
    d = work / f"data-{setting}"
    if (d / "meta.json").exists():
        return d
    if setting == "shakespeare":
        return prepare(str(args.input), d, tokenizer="char", progress=False)
    return prepare(
        "stdlib", d, tokenizer="bpe", vocab_size=args.bpe_vocab, limit=args.bpe_docs, progress=False
    )


def run(name: str, setting: str, data: Path, work: Path, settings: dict, seed: int, threads: int) -> dict:
    cfg = TrainConfig.from_dict(
        {
            **settings,
            "data_dir": str(data),
            "out_dir": str(work / f"{setting}-{name}"),
            "seed": seed,
            "threads": threads,
        }
    )
    trainer = Trainer(cfg)
    load0, cpu0 = os.getloadavg()[0], time.process_time()
    s = trainer.train()
    cpu = time.process_time() - cpu0
    out = {
        "benchmark": "improved_vs_baseline",
        "setting": setting,
        "run": name,
        "model": cfg.model,
        "model_args": cfg.model_args,
        "params": trainer.model.num_params(),
        "block_size": trainer.block_size,
        "steps": s["step"],
        "tokens": s["tokens"],
        "wall_s": round(s["wall_s"], 1),
        "cpu_s": round(cpu, 1),
        "tokens_per_s": round(s["tokens"] / s["wall_s"]),
        "lr": cfg.lr,
        "val_loss": round(s["val_loss"], 4),
        "val_loss_200": round(trainer.evaluate(iters=200), 4),
        "stop_reason": s["stop_reason"],
        "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(out), flush=True)
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| setting | run | params | steps | tokens | wall s | cpu s | val loss | val 200 | load avg |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['run']} | {r['params']:,} | {r['steps']} | {r['tokens']:,} | "
            f"{r['wall_s']} | {r['cpu_s']} | {r['val_loss']} | {r['val_loss_200']} | "
            f"{r['load_avg'][0]}-{r['load_avg'][1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="tiny Shakespeare text file")
    p.add_argument("--settings", default="shakespeare,bpe", help="comma-separated: shakespeare, bpe")
    p.add_argument("--runs", default="baseline,tokens,time", help="comma-separated: baseline, tokens, time")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="the time budget's clock: wall, or process CPU time (fair on a machine shared with other jobs)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget of the improved@time run (default: the baseline run's time on --clock)",
    )
    p.add_argument("--bpe-vocab", type=int, default=2048)
    p.add_argument("--bpe-docs", type=int, default=400, help="stdlib files used (the first N)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    p.add_argument("--jsonl", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--table", type=Path, default=None, help="only print the table of a saved --jsonl file")
    args = p.parse_args()
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    if not args.input.is_file():
        raise SystemExit(f"improved_vs_baseline: {args.input}: no such file")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for setting in args.settings.split(","):
            data = prepare_setting(setting, args, work)
            runs = args.runs.split(",")
            improved = {**IMPROVED, "model_args": dict(IMPROVED_MODEL_ARGS)}
            base = None
            if "baseline" in runs:
                base = run("baseline", setting, data, work, BASELINE, args.seed, args.threads)
                rows.append(base)
            budget_tokens = base["tokens"] if base else BASELINE["max_steps"] * 12 * 64
            clock_key = "wall_s" if args.clock == "wall" else "cpu_s"
            budget_s = args.budget_s or (base[clock_key] if base else None)
            if "tokens" in runs:
                per_step = improved["batch_size"] * improved["block_size"]
                steps = budget_tokens // per_step
                rows.append(
                    run(
                        "improved@tokens",
                        setting,
                        data,
                        work,
                        {**improved, "max_steps": steps},
                        args.seed,
                        args.threads,
                    )
                )
            if "time" in runs:
                if budget_s is None:
                    raise SystemExit(
                        "improved_vs_baseline: the time run needs the baseline run or --budget-s"
                    )
                timed = {
                    **improved,
                    "max_steps": 10**7,
                    "max_time_s": budget_s,
                    "schedule_unit": "time",
                    "time_clock": args.clock,
                }
                rows.append(run("improved@time", setting, data, work, timed, args.seed, args.threads))
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    for r in rows:
                        if r["setting"] == setting:
                            f.write(json.dumps(r) + "\n")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
