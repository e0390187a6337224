"""``lmzoo bench train`` and ``lmzoo bench generate``: one JSON line of speed figures, the median of repeated
measurements with their spread (lmzoo.evaluation.bench)."""

from __future__ import annotations

import argparse
import json


def add_bench_parser(sub) -> None:
    """Register ``bench`` with its two subcommands on the ``lmzoo`` subparsers."""
    b = sub.add_parser("bench", help="speed of a training step or of decoding (JSON line: median and spread)",
                       description="Measure the fast paths (docs/performance.md): the median of --repeats timed "
                       "blocks, with the fastest and slowest. A preset's fields are given as --model.FIELD value.")
    bsub = b.add_subparsers(dest="bench_command", parser_class=type(b))

    t = bsub.add_parser("train", help="tokens/s, step ms and MFU of a training step")
    t.add_argument("--preset", default="gpt2", help="model preset (default gpt2)")
    t.add_argument("--batch", type=int, default=12, help="sequences per step (default 12)")
    t.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's context, "
                   "at most 1024)")
    t.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20 on a GPU, 5 on a CPU)")
    t.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    t.add_argument("--vocab_multiple", type=int, default=128, help="pad the vocabulary to a multiple (default 128)")
    t.add_argument("--ce_chunk", type=int, default=0, help="chunked cross-entropy, tokens per chunk (0: plain)")
    t.add_argument("--peak_flops", type=float, default=None, help="the device's peak FLOP/s for MFU (CPU)")
    t.add_argument("--sdpa", default=None, help="prefer an attention kernel: cudnn, flash, efficient or math")

    g = bsub.add_parser("generate", help="decoding tokens/s and memory-bandwidth utilization")
    g.add_argument("--preset", default="gpt2", help="model preset (default gpt2), random weights")
    g.add_argument("--new_tokens", type=int, default=None, help="tokens to generate (default 256, or what the "
                   "preset's context leaves after the prompt)")
    g.add_argument("--prompt_len", type=int, default=16, help="random prompt tokens (default 16)")
    g.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    for p in (t, g):
        p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
        p.add_argument("--dtype", default=None, help="compute dtype: bf16, fp16 or fp32 (default: bf16 on a GPU "
                       "that has it, else fp32)")
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile (default: on CUDA only)")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(settings="model")
    b.set_defaults(func=cmd_bench, settings="model")


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.cli.options import model_overrides
    from lmzoo.common import resolve_device, smoke_mode
    from lmzoo.errors import ConfigError
    from lmzoo.evaluation.bench import bench_generate, bench_train

    if args.bench_command not in ("train", "generate"):
        raise ConfigError("bench: choose train or generate (lmzoo bench train --preset gpt2 --batch 12)")
    model_args = model_overrides(extra)
    repeats = 1 if smoke_mode() else args.repeats  # the docs' smoke tests (LMZOO_SMOKE=1)
    if args.bench_command == "train":
        steps = args.steps or (20 if resolve_device(args.device).type == "cuda" else 5)
        warmup = args.warmup
        if smoke_mode():
            steps, warmup = 1, min(warmup, 1)
        res = bench_train(
            args.preset, args.batch, args.seq, steps, warmup, args.compile, args.dtype, args.device,
            args.vocab_multiple, args.ce_chunk, args.peak_flops, args.seed, model_args, args.sdpa, repeats=repeats,
        )
        losses = res.pop("losses")
        res["loss_first"], res["loss_last"] = losses[0], losses[-1]
    else:
        res = bench_generate(
            args.preset, args.new_tokens, args.prompt_len, args.batch, args.dtype, args.device, args.compile,
            args.seed, model_args, repeats=repeats,
        )
    print(json.dumps(res))
    return 0
