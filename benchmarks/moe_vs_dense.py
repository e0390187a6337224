"""Mixtral-style sparse MoE vs the dense model with the same active parameters: forward + backward time.

The MoE model has ``n_experts`` SwiGLU experts of width ``expert_hidden`` per layer and routes each
token to ``top_k`` of them; the dense model is the same Llama with one SwiGLU of width
``top_k * expert_hidden``, so both compute the same matmul FLOPs per token (the MoE adds a tiny
router). Any gap is the price of dispatch: routing, sorting the token copies by expert, one
matmul chain per expert, and putting the results back (lmzoo/layers/moe.py).

One JSON line per model (and per isolated MLP layer), then a summary line with the ratios.

    python benchmarks/moe_vs_dense.py                      # batch 8 x 256 tokens on the CPU
    python benchmarks/moe_vs_dense.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import lmzoo
from lmzoo.layers.mlp import SwiGLU
from lmzoo.layers.moe import MoE


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict, device: str, warmup: int, reps: int) -> dict[str, list[float]]:
    """Run the steps in turn, ``reps`` rounds: load changes on a shared machine hit all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
    }
    common = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_kv_head=2, vocab_size=args.vocab,
                  block_size=args.seq)
    models = {
        "moe": dict(
            common, n_experts=args.n_experts, n_experts_per_tok=args.top_k, mlp_hidden=args.expert_hidden
        ),
        "dense": dict(common, mlp_hidden=args.top_k * args.expert_hidden),
    }
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    built, steps = {}, {}
    for name, over in models.items():
        torch.manual_seed(0)
        built[name] = model = lmzoo.build("llama-debug", **over).to(dev).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(x, x).loss.backward()

        steps[name] = step
    # the MLP layer alone, where the whole difference lives
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.seq, args.n_embd, device=dev)
    layers = {
        "moe_layer": MoE(args.n_embd, args.expert_hidden, args.n_experts, args.top_k).to(dev),
        "dense_layer": SwiGLU(args.n_embd, args.top_k * args.expert_hidden).to(dev),
    }
    for name, layer in layers.items():

        def step(layer=layer):
            layer.zero_grad(set_to_none=True)
            out = layer(h)
            y = out[0] + 0 * out[1].balance_loss if isinstance(out, tuple) else out
            y.square().mean().backward()

        steps[name] = step

    times = time_interleaved(steps, dev, args.warmup, args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        rec = {"bench": "moe_vs_dense", "what": "model fwd+bwd" if name in built else "MLP layer fwd+bwd",
               "model": name, **env}
        if name in built:
            m = built[name]
            rec.update(config=models[name], params=m.num_params(), active_params=m.active_params(),
                       tokens_per_s=round(args.batch * args.seq / median[name]))
        rec.update(median_s=round(median[name], 4), min_s=round(min(t), 4))
        print(json.dumps(rec))
    print(json.dumps({
        "bench": "moe_vs_dense", "what": "summary", **env,
        "model_time_ratio_moe_over_dense": round(median["moe"] / median["dense"], 3),
        "layer_time_ratio_moe_over_dense": round(median["moe_layer"] / median["dense_layer"], 3),
        "limit": 1.5,
        "ok": median["moe"] / median["dense"] <= 1.5,
    }))


if __name__ == "__main__":
    main()
