"""The figures of the trainer's doc pages, measured on this machine (one JSON line each).

    python benchmarks/trainer_features.py --input ../shared/data/tinyshakespeare.txt [--only NAME,...]

- ``precision``: val loss and step time of the same short run in float32, bf16 autocast, bf16
  parameters (norms in float32 or not) and fp16 autocast with a loss scale (docs/mixed-precision.md)
- ``schedules``: final val loss of cosine, WSD and constant at the same budget (docs/lr-schedules.md)
- ``accumulation``: accumulated vs one large batch, parameter difference and tokens/s
  (docs/gradient-accumulation.md)
- ``checkpointing``: peak activation memory and step time with and without activation
  checkpointing (docs/gradient-checkpointing.md)
- ``ckpt_io``: checkpoint size and write/resume time (docs/checkpointing.md)
- ``mfu``: a CPU's measured matmul peak and the MFU of the nanoGPT CPU recipe against it (docs/mfu.md)

Timings depend on the machine's load: each line carries ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lmzoo.data import prepare
from lmzoo.models import build
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.activation_checkpointing import apply_activation_checkpointing, peak_memory_bytes

CPU_RECIPE = dict(
    model="gpt2-char-cpu",
    batch_size=12,
    block_size=64,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=50,
    beta2=0.99,
    eval_iters=20,
    device="cpu",
    dtype="float32",
    progress=False,
    sample_tokens=0,
    keep_last=1,
)


def emit(**rec) -> None:
    rec["load_avg"] = round(os.getloadavg()[0], 2)
    print(json.dumps(rec), flush=True)


def short_run(data: Path, out: Path, steps: int, **kw) -> tuple[dict, Trainer]:
    cfg = TrainConfig.from_dict(
        {
            **CPU_RECIPE,
            "max_steps": steps,
            "eval_interval": steps,
            "data_dir": str(data),
            "out_dir": str(out),
            **kw,
        }
    )
    t = Trainer(cfg)
    return t.train(), t


def precision(data: Path, work: Path, steps: int) -> None:
    variants = {
        "float32": {},
        "bf16 autocast": {"dtype": "bfloat16"},
        "bf16 params, fp32 norms": {"dtype": "bfloat16", "param_dtype": "bfloat16"},
        "bf16 params, bf16 norms": {"dtype": "bfloat16", "param_dtype": "bfloat16", "fp32_norms": False},
        "fp16 autocast + GradScaler": {"dtype": "float16"},
    }
    for name, kw in variants.items():
        s, t = short_run(data, work / f"prec-{len(name)}-{kw.get('fp32_norms', 1)}", steps, **kw)
        emit(
            figure="precision",
            variant=name,
            steps=steps,
            val_loss=round(s["val_loss"], 4),
            ms_per_step=round(1000 * s["wall_s"] / steps, 1),
            nonfinite=s["nonfinite_steps"],
        )


def schedules(data: Path, work: Path, steps: int, fig_dir: Path | None) -> None:
    for sched in ("cosine", "wsd", "constant"):
        s, _ = short_run(data, work / f"sched-{sched}", steps, schedule=sched, lr=2e-3)
        emit(figure="schedules", schedule=sched, steps=steps, lr=2e-3, val_loss=round(s["val_loss"], 4))
    if fig_dir is not None:  # the three shapes, from the same function the trainer calls
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lmzoo.train.schedule import lr_at

        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
        xs = range(2000)
        for sched in ("cosine", "wsd", "constant"):
            kw = dict(lr=1e-3, min_lr=1e-4, warmup=100, total=2000, schedule=sched, decay_frac=0.2)
            ax.plot(xs, [lr_at(i, **kw) for i in xs], label=sched)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title("lr=1e-3, min_lr=1e-4, warmup 100, 2000 steps, wsd_decay_frac 0.2")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(fig_dir / "lr-schedules.png")


def accumulation(data: Path, work: Path, steps: int) -> None:
    params = []
    for batch, accum in ((24, 1), (6, 4)):
        torch.manual_seed(0)
        s, t = short_run(
            data,
            work / f"acc-{accum}",
            steps,
            batch_size=batch,
            grad_accum=accum,
            eval_interval=0,
            sample_tokens=0,
        )
        params.append(torch.cat([p.detach().flatten() for p in t.model.parameters()]))
        emit(figure="accumulation", batch_size=batch, grad_accum=accum, tokens_per_s=round(s["tokens_per_s"]))
    # the data order differs (the loader draws per micro-batch), so compare one step on one batch instead
    torch.manual_seed(0)
    x, y = torch.randint(0, 65, (24, 64)), torch.randint(0, 65, (24, 64))
    grads = []
    for k in (1, 4):
        m = build("gpt2-char-cpu")
        torch.manual_seed(0)
        m.load_state_dict(build("gpt2-char-cpu").state_dict())
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (m(xs, ys).loss / k).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    rel = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    emit(figure="accumulation", grad_rel_diff_1x24_vs_4x6=rel)


def checkpointing() -> None:
    for preset, kw, B, T in (
        ("gpt2-char-cpu", {}, 12, 64),
        ("gpt2-char-cpu", {"n_layer": 8}, 12, 64),
        ("gpt2-char-cpu", {"n_layer": 8, "block_size": 256}, 12, 256),
        ("llama-debug", {"n_layer": 8, "n_embd": 128, "mlp_hidden": 384, "block_size": 256}, 12, 256),
    ):
        torch.manual_seed(0)
        model = build(preset, **kw).train()
        V = model.config.vocab_size
        x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

        def step(model=model, x=x, y=y):
            model.zero_grad(set_to_none=True)
            model(x, y).loss.backward()

        res = {}
        for on in (False, True):
            if on:
                apply_activation_checkpointing(model)
            step()
            peak = peak_memory_bytes(step)
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            res[on] = (peak, (time.perf_counter() - t0) / 5)
        emit(
            figure="checkpointing",
            preset=preset,
            overrides=kw,
            batch=B,
            context=T,
            params=model.num_params(),
            peak_mb=round(res[False][0] / 2**20, 1),
            peak_mb_ckpt=round(res[True][0] / 2**20, 1),
            ms=round(1000 * res[False][1], 1),
            ms_ckpt=round(1000 * res[True][1], 1),
        )


def ckpt_io(data: Path, work: Path) -> None:
    for preset in ("gpt2-char-cpu", "gpt2"):
        cfg = TrainConfig.from_dict(
            {
                **CPU_RECIPE,
                "model": preset,
                "max_steps": 1,
                "eval_interval": 0,
                "batch_size": 1,
                "block_size": 64,
                "data_dir": str(data),
                "out_dir": str(work / f"io-{preset}"),
            }
        )
        t = Trainer(cfg)
        t.train()
        t0 = time.perf_counter()
        d = t.save_checkpoint()
        write = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        Trainer(cfg.replace(resume=True))
        emit(
            figure="ckpt_io",
            preset=preset,
            params=t.model.num_params(),
            size_mb=round(size / 2**20, 1),
            write_s=round(write, 2),
            resume_s=round(time.perf_counter() - t0, 2),
        )


def cpu_peak_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def mfu_figure(data: Path, work: Path, steps: int) -> None:
    peak = cpu_peak_flops()
    s, t = short_run(data, work / "mfu", steps, peak_flops=peak, eval_interval=0)
    emit(
        figure="mfu",
        threads=torch.get_num_threads(),
        matmul_peak_gflops=round(peak / 1e9, 1),
        flops_per_token=t.flops_per_token,
        tokens_per_s=round(s["tokens_per_s"]),
        mfu=round(t.flops_per_token * s["tokens_per_s"] / peak, 4),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="tiny Shakespeare text file")
    p.add_argument("--only", default="precision,schedules,accumulation,checkpointing,ckpt_io,mfu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fig-dir", type=Path, default=None, help="write the schedule figure here (docs/figures)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    only = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(str(args.input), work / "data", tokenizer="char", progress=False)
        if "precision" in only:
            precision(data, work, args.steps)
        if "schedules" in only:
            schedules(data, work, args.steps, args.fig_dir)
        if "accumulation" in only:
            accumulation(data, work, 30)
        if "checkpointing" in only:
            checkpointing()
        if "ckpt_io" in only:
            ckpt_io(data, work)
        if "mfu" in only:
            mfu_figure(data, work, 100)


if __name__ == "__main__":
    main()
