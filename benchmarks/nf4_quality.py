"""NF4 (QLoRA's 4-bit NormalFloat) on CPU: quantization error, memory, and the cost of dequantizing on the fly.

Prints JSON lines (docs/qlora-nf4.md):

- ``error``: relative RMS error ||W_q - W|| / ||W|| of an N(0, 0.02^2) 1024 x 1024 weight, NF4 with and
  without double quantization, and a linear 4-bit absmax code (levels -7..7, the same 64-weight blocks)
  for comparison; bits per weight of each;
- ``memory``: stored weight bytes against bf16 for the quantized layers of llama-debug at n_embd 256
  (linears dominate) and for GPT-2 124M (``lmzoo info gpt2 --nf4``'s estimate, built on the meta device);
- ``speed``: a 1024 x 1024 forward of 8 tokens, NF4 (dequantized every call) against a float32 matmul,
  median of ``--repeat``.

    python benchmarks/nf4_quality.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import lmzoo
from lmzoo.memguard import MetaWithoutInit
from lmzoo.peft.qlora import apply_qlora, estimate, memory_report
from lmzoo.quant.nf4 import NF4Linear


def rel_rms(approx: torch.Tensor, w: torch.Tensor) -> float:
    return ((approx.double() - w.double()).pow(2).mean().sqrt() / w.double().pow(2).mean().sqrt()).item()


def linear_int4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Blockwise absmax onto the 15 evenly spaced levels -7..7 (the linear code NF4 is compared with)."""
    blocks = w.reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    return ((blocks / scale).round().clamp(-7, 7) * scale).reshape(w.shape)


def linear_layer(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def error(emit) -> None:
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    for double in (False, True):
        m = NF4Linear(linear_layer(w), compute_dtype=torch.float32, double_quant=double)
        emit({"bench": "error", "code": "nf4", "double_quant": double,
              "rel_rms_error": round(rel_rms(m.dequantize(), w), 4),
              "bits_per_weight": round(8 * m.weight_bytes() / w.numel(), 3)})
    emit({"bench": "error", "code": "linear_int4_absmax", "double_quant": False,
          "rel_rms_error": round(rel_rms(linear_int4(w), w), 4), "bits_per_weight": round(4 + 32 / 64, 3)})


def memory(emit) -> None:
    model = lmzoo.build("llama-debug", n_embd=256, n_head=4, n_kv_head=4, vocab_size=64)
    apply_qlora(model, r=4)
    r = memory_report(model)
    emit({"bench": "memory", "model": "llama-debug n_embd=256", "quantized_ratio": round(r["quantized_ratio"], 3),
          "model_ratio": round(r["ratio"], 3),
          **{k: r[k] for k in ("quantized_bytes", "model_bytes", "model_bf16_bytes")}})
    with MetaWithoutInit():
        gpt2 = lmzoo.build("gpt2")
    e = estimate(gpt2)
    emit({"bench": "memory", "model": "gpt2", "model_ratio": round(e["ratio"], 3),
          "quantized_ratio": round(e["quantized_bytes"] / e["quantized_bf16_bytes"], 3),
          "token_embedding_params": max(m.weight.numel() for m in gpt2.modules() if isinstance(m, torch.nn.Embedding)),
          **{k: e[k] for k in ("quantized_bytes", "model_bytes", "model_bf16_bytes")}})


def speed(emit, repeat: int) -> None:
    w = torch.randn(1024, 1024) * 0.02
    lin = linear_layer(w)
    nf4 = NF4Linear(lin, compute_dtype=torch.float32)
    x = torch.randn(8, 1024)
    times: dict[str, list[float]] = {"nf4": [], "float32": []}
    with torch.no_grad():
        for _ in range(repeat):  # the two take turns, so a change in the machine's load hits both
            for name, layer in (("nf4", nf4), ("float32", lin)):
                t = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - t)
    emit({"bench": "speed", "shape": [1024, 1024], "tokens": 8, "threads": torch.get_num_threads(),
          **{f"{k}_ms": round(1e3 * statistics.median(v), 2) for k, v in times.items()},
          "load_avg": [round(x, 2) for x in os.getloadavg()]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=21)
    args = p.parse_args()
    emit = lambda rec: print(json.dumps(rec), flush=True)  # noqa: E731
    error(emit)
    memory(emit)
    speed(emit, args.repeat)


if __name__ == "__main__":
    main()
