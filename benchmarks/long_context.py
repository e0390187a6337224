"""Long-context answers at equal budget: ALiBi, linear attention, Infini-attention, Transformer-XL,
cross-layer KV sharing, against the GPT-2-improved baseline of the same size (issue 6).

Every model is 4 layers x 128 wide x 4 heads (the ``gpt2-improved-char-cpu`` recipe: RoPE, GQA 4:2, no
biases, RMSNorm, SwiGLU; each run changes one thing), trained by the
shared trainer on character-level tiny Shakespeare for the same steps and tokens (300 x 16 x 128
by default). Prints one JSON line per run:

- ``train``: params, median training tokens/s, val loss at the training context (the trainer's
  evaluation: random 128-token windows, 20 batches), KV-cache / state bytes per row at 512 tokens;
- ``lengths``: mean loss over the same 8,192 val tokens cut into windows of 128, 256 and 512 tokens
  (the extrapolation table; learned positions cannot go past their table: ``null``). Transformer-XL
  reads each 512-token window in 128-token segments with memories of 0, 128 and 384 states;
- ``infini_study``: Infini-attention on a pretrained Llama-family model (trained here, exported to
  HF and loaded back with ``from_hf``): loss at 512 tokens before and after fine-tuning on 512-token
  sequences, against the original model with its full context and with a truncated one (each
  128-token segment alone), the original fine-tuned as many steps at 128 tokens as a control;
- ``speed``: training-step tokens/s of each model measured round-robin, best of 7 (less exposed to
  the drifting load of a shared machine than the runs' own tokens/s).

    python benchmarks/long_context.py --input ../shared/data/tinyshakespeare.txt
    python benchmarks/long_context.py --input ... --only alibi rope learned --steps 50

Timings share the CPU with whatever else runs: each line carries ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmzoo
from lmzoo.data import prepare
from lmzoo.models.infini import to_infini
from lmzoo.train import TrainConfig, Trainer
from lmzoo.train.metrics import read_metrics

BASE = dict(
    batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=30, eval_interval=0, eval_iters=20,
    device="cpu", dtype="float32", progress=False, sample_tokens=0, threads=1, keep_last=1,
)
IMPROVED = "gpt2-improved-char-cpu"
# the improved recipe spelled out (RoPE, GQA 4:2, no biases, RMSNorm, SwiGLU), so a later change of the
# preset does not silently change what this benchmark compares
IMPROVED_ARGS = dict(pos_emb="rope", n_kv_head=2, bias=False, norm="rmsnorm", mlp="swiglu")
RUNS: dict[str, tuple[str, dict, dict]] = {  # name -> (preset, model_args, train overrides)
    "rope": (IMPROVED, {}, {}),  # the baseline
    "learned": (IMPROVED, {"pos_emb": "learned"}, {}),
    "alibi": (IMPROVED, {"pos_emb": "alibi"}, {}),
    "linear": (IMPROVED, {"attention": "linear", "pos_emb": "none"}, {}),
    "infini": (IMPROVED, {"attention": "infini", "infini_segment": 32}, {}),
    "infini-delta": (IMPROVED, {"attention": "infini", "infini_segment": 32, "infini_delta_rule": True}, {}),
    "kv-share-2": (IMPROVED, {"kv_share_every": 2}, {}),
    "transformer-xl": ("transformer-xl-char-cpu", {"mem_len": 128}, {"recurrence": True}),
}
for _preset, _args, _ in RUNS.values():
    if _preset == IMPROVED:
        _args.update({k: v for k, v in IMPROVED_ARGS.items() if k not in _args})
LLAMA = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=384, vocab_size=65)
EVAL_TOKENS = 8192


def emit(**fields) -> None:
    print(json.dumps({**fields, "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def train(data: Path, out: Path, steps: int, preset: str, model_args: dict, model=None, **kw) -> tuple:
    cfg = TrainConfig.from_dict({**BASE, "model": preset, "model_args": {**model_args, "block_size": 128},
                                 "data_dir": str(data), "out_dir": str(out), "max_steps": steps, **kw})
    trainer = Trainer(cfg, model=model)
    summary = trainer.train()
    tok_s = statistics.median(r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train")
    return trainer, summary, tok_s


@torch.no_grad()
def window_loss(model, val: torch.Tensor, L: int, segment: int | None = None, memory: int = 0) -> float | None:
    """Mean loss over the first EVAL_TOKENS val tokens cut into windows of L (rows of a batch).

    ``segment``: read each window in segments of this many tokens through the model's cache with
    ``memory`` states (Transformer-XL). None when the model's positions cannot reach L.
    """
    limit = model.max_positions()
    if limit is not None and L > limit:
        return None
    x = val[:EVAL_TOKENS].view(-1, L)
    y = val[1 : EVAL_TOKENS + 1].view(-1, L)
    model.eval()
    losses = []
    for b in range(0, x.shape[0], 16):
        xb, yb = x[b : b + 16], y[b : b + 16]
        if segment is None:
            losses.append(model(xb, yb).loss.item() * xb.numel())
            continue
        cache = model.init_cache(xb.shape[0], max_len=memory)
        for t in range(0, L, segment):
            losses.append(model(xb[:, t : t + segment], yb[:, t : t + segment], cache=cache).loss.item()
                          * xb[:, t : t + segment].numel())
    return round(sum(losses) / x.numel(), 4)


def state_bytes(model, tokens: int = 512) -> int:
    """Decoding state per row after ``tokens`` tokens (KV cache, linear state, Infini memory, XL memory)."""
    cache = model.init_cache(1, max_len=tokens if model.family != "transformer-xl" else None)
    with torch.no_grad():  # a KV cache is allocated whole; an XL memory fills up as it reads
        model(torch.zeros(1, min(tokens, model.max_positions() or tokens), dtype=torch.long), cache=cache)
    return cache.nbytes


def run_model(name: str, data: Path, work: Path, steps: int, val: torch.Tensor) -> None:
    preset, args, kw = RUNS[name]
    trainer, summary, tok_s = train(data, work / name, steps, preset, args, **kw)
    m = trainer.model
    emit(bench="train", run=name, seed=trainer.cfg.seed, preset=preset, model_args=args, params=m.num_params(),
         steps=summary["step"], tokens=summary["tokens"], tokens_per_s=round(tok_s),
         val_loss=round(summary["val_loss"], 4), state_bytes_512=state_bytes(m), recurrence=bool(kw.get("recurrence")))
    lengths = {f"loss_{L}": window_loss(m, val, L) for L in (128, 256, 512)}
    if m.family == "transformer-xl":  # the same 512-token windows in 128-token segments, with memory
        for mem in (0, 128, 384):
            lengths[f"loss_512_seg128_mem{mem}"] = window_loss(m, val, 512, segment=128, memory=mem)
    emit(bench="lengths", run=name, **lengths)


def infini_study(data: Path, work: Path, steps: int, finetune: int, val: torch.Tensor) -> None:
    """Pretrain a Llama at 128 tokens, load it back through HF, convert, fine-tune at 512."""
    trainer, _, _ = train(data, work / "llama", steps, "llama-debug", LLAMA)
    lmzoo.to_hf(trainer.model, work / "llama-hf")
    original = lmzoo.from_hf(work / "llama-hf")
    converted = to_infini(original, segment=128)
    res = {
        "original_full_512": window_loss(original, val, 512),
        "original_truncated_128": window_loss(original, val, 128),
        "infini_before_512": window_loss(converted, val, 512),
    }
    # fine-tune the converted model on 512-token sequences (4 segments), as many tokens per step
    _, _, tok_s = train(data, work / "infini-ft", finetune, "llama-debug", LLAMA, model=converted,
                        block_size=512, batch_size=4, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    res["infini_after_512"] = window_loss(converted, val, 512)
    gates = torch.stack([torch.sigmoid(b.attn.gate) for b in converted.blocks])
    res["infini_gate_mean"] = round(gates.mean().item(), 4)  # the memory's share of each head's output
    # control: the original fine-tuned the same steps and tokens at its own 128-token context
    control = lmzoo.from_hf(work / "llama-hf")
    train(data, work / "control-ft", finetune, "llama-debug", LLAMA, model=control,
          warmup_steps=10, lr=1e-3, min_lr=1e-4)
    res["original_ft_truncated_128"] = window_loss(control, val, 128)
    res["original_ft_full_512"] = window_loss(control, val, 512)
    emit(bench="infini_study", pretrain_steps=steps, finetune_steps=finetune, infini_ft_tokens_per_s=round(tok_s),
         **res)


def speed(rounds: int = 7) -> None:
    """Training-step tokens/s of every run's model (forward + backward of 16 x 128 tokens), measured
    round-robin and best-of-``rounds``: the load of a shared machine drifts, interleaving spreads it."""
    models, caches = {}, {}
    for name, (preset, args, kw) in RUNS.items():
        torch.manual_seed(0)
        models[name] = lmzoo.build(preset, **args, block_size=128, vocab_size=65).train()
        caches[name] = bool(kw.get("recurrence"))
    x = torch.randint(0, 65, (16, 128))
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for name, m in models.items():
            cache = None
            if caches[name]:  # a full memory, as in training
                cache = m.init_cache(16)
                with torch.no_grad():
                    m(x, cache=cache)
            t0 = time.perf_counter()
            m(x, x, cache=cache).loss.backward()
            best[name] = min(best[name], time.perf_counter() - t0)
            m.zero_grad(set_to_none=True)
    for name, dt in best.items():
        emit(bench="speed", run=name, step_ms=round(1000 * dt, 1), tokens_per_s=round(x.numel() / dt),
             threads=torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="tiny Shakespeare text file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--only", nargs="*", default=None, help=f"runs among {', '.join(RUNS)}, infini_study, speed")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--seed", type=int, default=1337, help="training seed (run twice to see the noise)")
    args = p.parse_args()
    BASE["seed"] = args.seed
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the training runs (TrainConfig.threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = work / "data"
        if not (data / "meta.json").exists():
            prepare(str(args.input), data, tokenizer="char")
        meta = json.loads((data / "meta.json").read_text())
        val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=meta["dtype"]).astype(np.int64))
        t0 = time.time()
        for name in args.only or [*RUNS, "infini_study", "speed"]:
            if name == "speed":
                speed()
            elif name == "infini_study":
                infini_study(data, work, args.steps, args.finetune_steps, val)
            else:
                run_model(name, data, work, args.steps, val)
        emit(bench="done", wall_s=round(time.time() - t0), torch=torch.__version__, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
