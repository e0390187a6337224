"""Distillation vs data alone at equal steps: val loss of the same small student (prints JSON lines).

    python benchmarks/distill.py [--teacher-steps 600] [--student-steps 300] [--seeds 0,1,2] [--input PATH]

Everything runs through the shared trainer, as ``lmzoo train`` / ``lmzoo finetune`` would: a 4-layer,
128-wide teacher is trained on character-level tiny Shakespeare (``lmzoo.train``); then the same
2-layer, 48-wide student (same preset, seed, batches and steps) is trained twice: on the data alone
(``finetune(preset)``: CE, as ``lmzoo train``) and distilled (``finetune(preset, teacher=...)``:
alpha * CE + (1 - alpha) * T^2 * KL). Val loss is the student's own CE on the same val batches.
Each seed (student init, batches, val batches; the same for both arms) repeats the pair. A teacher
already in ``<out>/teacher`` is reused. Each run prints one JSON line; the last line is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import lmzoo
from lmzoo.peft.finetune import finetune

ARCH = dict(n_head=4, n_kv_head=4, mlp="gelu", pos_emb="learned")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--input", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--seeds", default="0", help="student seeds, comma-separated")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    common = dict(source="shakespeare", input=a.input, tokenizer="char", data_dir=str(out / "data"),
                  block_size=64, batch_size=32, seed=0, threads=1, device="cpu", progress=False,
                  eval_iters=20, warmup_steps=20, weight_decay=0.0, sample_tokens=0)
    t0 = time.time()
    if not (out / "teacher" / "LATEST").is_file():
        teacher = lmzoo.train(model="gpt2-debug", model_args=dict(n_layer=4, n_embd=128, **ARCH), lr=2e-3,
                              min_lr=2e-4, max_steps=a.teacher_steps, eval_interval=a.teacher_steps,
                              out_dir=str(out / "teacher"), **common)
        print(json.dumps({"run": "teacher", "val_loss": teacher["val_loss"], "steps": a.teacher_steps,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    ends = [json.loads(x) for x in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    res: dict = {"teacher_val": [r["val_loss"] for r in ends if r["kind"] == "eval"][-1],
                 "data_only_val": [], "distilled_val": []}
    for seed in [int(x) for x in a.seeds.split(",")]:
        student = dict(model_args=dict(n_layer=2, n_embd=48, **ARCH), lr=3e-3, min_lr=3e-4,
                       max_steps=a.student_steps, eval_interval=a.student_steps, **{**common, "seed": seed})
        for name, extra in (("data_only", {}), ("distilled", dict(teacher=str(out / "teacher"), kd_alpha=a.alpha,
                                                                   temperature=a.temperature))):
            t1 = time.time()
            s = finetune("gpt2-debug", out_dir=str(out / f"{name}-{seed}"), **extra, **student)
            res[f"{name}_val"].append(s["val_loss"])
            res["student_params"] = s["trainable"]
            print(json.dumps({"run": name, "seed": seed, "val_loss": s["val_loss"], "steps": s["step"],
                              "seconds": round(time.time() - t1, 1)}), flush=True)
    gaps = [d - k for d, k in zip(res["data_only_val"], res["distilled_val"])]
    res["gain_mean"], res["gain_min"] = sum(gaps) / len(gaps), min(gaps)  # data_only - distilled
    res["teacher_params"] = lmzoo.load(out / "teacher").num_params()
    res.update(vars(a), seconds=round(time.time() - t0, 1), loadavg=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
