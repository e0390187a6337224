"""Distillation vs data alone at equal steps: val loss of the same small student (prints a JSON line).

    python benchmarks/distill.py [--teacher-steps 400] [--student-steps 300]

Data: bytes of Python's standard-library sources (always present, no download). A 4-layer, 128-wide
teacher is trained first; then two copies of a 2-layer, 48-wide student (same seed) train for the same
steps: one with CE on the data only (alpha = 1), one with alpha * CE + (1 - alpha) T^2 KL (teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import torch

import lmzoo
from lmzoo.peft.distill import distill


def corpus(n_bytes: int = 400_000) -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:n_bytes]
    return torch.tensor(list(data), dtype=torch.long)


def batches(data: torch.Tensor, T: int, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, data.numel() - T - 1, (B,), generator=g)
        x = torch.stack([data[j:j + T] for j in i.tolist()])
        y = torch.stack([data[j + 1:j + T + 1] for j in i.tolist()])
        yield x, y


@torch.no_grad()
def val_loss(model, data, T=64, B=32, n=10) -> float:
    model.eval()
    it = batches(data, T, B, seed=123)
    out = sum(model(*next(it)).loss.item() for _ in range(n)) / n
    model.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    data = corpus()
    n = int(0.9 * data.numel())
    train, val = data[:n], data[n:]
    t0 = time.time()
    common = dict(vocab_size=256, block_size=64, mlp="gelu")
    teacher = lmzoo.build("gpt2-debug", n_layer=4, n_embd=128, n_head=4, n_kv_head=4, **common)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    it = batches(train, 64, 32, 0)
    for _ in range(a.teacher_steps):
        loss = teacher(*next(it)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    results = {"teacher_val": val_loss(teacher, val), "teacher_params": teacher.num_params()}
    for name, alpha in (("data_only", 1.0), ("distilled", a.alpha)):
        torch.manual_seed(1)
        student = lmzoo.build("gpt2-debug", n_layer=2, n_embd=48, n_head=4, n_kv_head=4, **common)
        distill(student, teacher, batches(train, 64, 32, 1), a.student_steps, lr=2e-3, alpha=alpha,
                temperature=a.temperature)
        results[f"{name}_val"] = val_loss(student, val)
        results["student_params"] = student.num_params()
    results.update(vars(a), seconds=round(time.time() - t0, 1), loadavg=os.getloadavg())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
