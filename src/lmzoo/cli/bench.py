"""``lmzoo bench train`` and ``lmzoo bench generate``: one JSON line of speed figures (lmzoo.evaluation.bench)."""

from __future__ import annotations

import argparse
import json


def add_bench_parser(sub) -> None:
    """Register ``bench`` with its two subcommands on the ``lmzoo`` subparsers."""
    b = sub.add_parser("bench", help="speed of a training step or of decoding (JSON line)",
                       description="Measure the fast paths (docs/performance.md). Extra --key=value "
                       "settings override the preset's model config.")
    bsub = b.add_subparsers(dest="bench_command", parser_class=type(b))
    common = dict(dtype=("bf16", "compute dtype: bf16, fp16 or fp32"))

    t = bsub.add_parser("train", help="tokens/s, step ms and MFU of a training step")
    t.add_argument("--preset", default="gpt2", help="model preset (default gpt2)")
    t.add_argument("--batch", type=int, default=12, help="sequences per step (default 12)")
    t.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    t.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    t.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    t.add_argument("--vocab-multiple", type=int, default=128, help="pad the vocabulary to a multiple (default 128)")
    t.add_argument("--ce-chunk", type=int, default=0, help="chunked cross-entropy, tokens per chunk (0: plain)")
    t.add_argument("--peak-flops", type=float, default=None, help="the device's peak FLOP/s for MFU (CPU)")
    t.add_argument("--sdpa", default=None, help="prefer an attention kernel: cudnn, flash, efficient or math")

    g = bsub.add_parser("generate", help="decoding tokens/s and memory-bandwidth utilization")
    g.add_argument("--preset", default="gpt2", help="model preset (default gpt2), random weights")
    g.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    g.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens (default 16)")
    g.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    for p in (t, g):
        p.add_argument("--dtype", default=common["dtype"][0], help=common["dtype"][1])
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile (default: on CUDA only)")
        p.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.config import parse_overrides
    from lmzoo.errors import ConfigError
    from lmzoo.evaluation.bench import bench_generate, bench_train

    model_args = parse_overrides(extra)
    if args.bench_command == "train":
        res = bench_train(
            args.preset, args.batch, args.seq, args.steps, args.warmup, args.compile, args.dtype, args.device,
            args.vocab_multiple, args.ce_chunk, args.peak_flops, args.seed, model_args, args.sdpa,
        )
        losses = res.pop("losses")
        res["loss_first"], res["loss_last"] = losses[0], losses[-1]
    elif args.bench_command == "generate":
        res = bench_generate(
            args.preset, args.new_tokens, args.prompt_len, args.batch, args.dtype, args.device, args.compile,
            args.seed, model_args,
        )
    else:
        raise ConfigError("bench: choose train or generate (lmzoo bench train --preset gpt2 --batch 12)")
    print(json.dumps(res))
    return 0
