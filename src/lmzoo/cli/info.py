"""``lmzoo info``: parameters, FLOPs/token, memory and compute-optimal budgets of a preset or checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmzoo.common import fmt_bytes
from lmzoo.errors import ConfigError
from lmzoo.memguard import MetaWithoutInit


def cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from lmzoo.cli.options import model_overrides
    from lmzoo.models import PRESETS, build, preset_config

    if args.list:
        from lmzoo.formats.registry import MODELS, available

        print("presets (random weights; lmzoo train --model NAME):")
        for name, (family, _) in sorted(PRESETS.items()):
            print(f"  {name:28s} {family}")
        print("pretrained models (by name wherever a checkpoint goes: lmzoo chat --checkpoint NAME):")
        for name, src in sorted(MODELS.items()):
            where = "installed" if available(name) else f"not installed: {src.install}"
            print(f"  {name:28s} {src.description} [{where}]")
        return 0
    from lmzoo.formats import registry
    from lmzoo.formats.load import is_gguf

    if args.preset and registry.is_name(args.preset) and not args.checkpoint:
        args.checkpoint, args.preset = args.preset, None  # `lmzoo info smollm2-135m-instruct`
    overrides = model_overrides(extra)  # --model.n_layer=6 (the convention everywhere), or --n_layer=6
    if args.flops is not None and not args.preset and not args.checkpoint:
        if overrides:
            raise ConfigError("info: overrides apply to presets, not to a FLOP budget")
        _print_chinchilla(None, args)
        return 0
    if args.checkpoint:
        if overrides:
            raise ConfigError("info: overrides apply to presets, not to a checkpoint")
        from lmzoo.formats import checkpoint as ckpt
        from lmzoo.models import build_model

        source = registry.resolve(args.checkpoint) if registry.is_name(args.checkpoint) else Path(args.checkpoint)
        if is_gguf(source):  # the config from the file's metadata; no tensor is read
            from lmzoo.formats.gguf import gguf_config

            family, cfg = gguf_config(source)
            with MetaWithoutInit():
                model = build_model(family, cfg)
        else:
            d = ckpt.resolve(args.checkpoint)
            family, cfg, raw = ckpt.read_config(d)
            with MetaWithoutInit():  # shapes only, initializers skipped (fast at any size)
                model = ckpt.apply_settings(build_model(family, cfg), raw, d / ckpt.CONFIG)  # e.g. MTP heads, BitNet
        name = args.checkpoint
    else:
        if not args.preset:
            raise ConfigError("info: give a preset name (see `lmzoo info --list`) or --checkpoint DIR")
        preset_config(args.preset, **overrides)  # validate before building anything
        with MetaWithoutInit():  # shapes only, initializers skipped (fast at any size)
            model = build(args.preset, **overrides)
        name = args.preset
    cfg = model.config
    T = args.seq_len or cfg.block_size
    n = model.num_params()
    print(f"{name} ({model.family})")
    print(f"  parameters           {n:,}")
    print(f"  non-embedding        {model.num_params(non_embedding=True):,}")
    print(f"  FLOPs/token (train)  {model.flops_per_token(T):.4g}  at context {T}")
    if getattr(model, "n_future", 1) > 1:  # a multi-token prediction checkpoint (lmzoo.models.mtp)
        print(f"  output heads         {model.n_future} (tokens t+1..t+{model.n_future}; counted above)")
    print("  weight memory        " + ", ".join(
        f"{k} {fmt_bytes(n * b)}" for k, b in (("fp32", 4), ("bf16", 2), ("int8", 1), ("4-bit", 0.5))
    ))
    print(f"  training memory      ~{fmt_bytes(16 * n)} (fp32 weights + grads + AdamW moments; activations extra)")
    # the decoding state the model itself builds (shapes only, on meta): a KV cache grows with the length,
    # a recurrent state (Mamba) or a ring of a sliding window does not
    state, longer = (model.init_cache(1, n_tok, dtype=torch.bfloat16, device="meta").nbytes for n_tok in (T, 2 * T))
    if longer > state:
        print(f"  KV cache per token   {fmt_bytes((longer - state) / T)} in bf16 ({fmt_bytes(state)} at {T} tokens)")
    else:
        print(f"  decoding state       {fmt_bytes(state)} per sequence in bf16 at {T} tokens")
    from lmzoo.quant import memory_lines

    for line in memory_lines(model):  # a quantized checkpoint: the memory it saves
        print(line)
    if args.nf4:
        from lmzoo.peft.qlora import memory_lines as nf4_lines

        for line in nf4_lines(model):  # the weight memory under QLoRA's NF4 (docs/qlora-nf4.md)
            print(line)
    if args.chinchilla or args.flops is not None:
        _print_chinchilla(model, args, T)
    return 0


def _measured_tokens_per_s(run_dir: str) -> float:
    """Median tokens/s of a run's train records (the first steps, compilation and warm-up, left out)."""
    import statistics

    from lmzoo.train.metrics import read_metrics

    if not (Path(run_dir) / "metrics.jsonl").is_file():
        raise ConfigError(f"info: {run_dir} has no metrics.jsonl to read tokens/s from")
    records = read_metrics(run_dir)
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and "tokens_per_s" in r]
    if not rates:
        raise ConfigError(f"info: {run_dir}/metrics.jsonl has no train records")
    return statistics.median(rates[min(len(rates) - 1, 5):])


def _print_chinchilla(model, args: argparse.Namespace, T: int | None = None) -> None:
    """Compute-optimal tokens for the model (or N and D for --flops), and the time at a tokens/s."""
    from lmzoo.train import chinchilla as ch

    rate = args.tokens_per_s
    if args.from_run:
        rate = _measured_tokens_per_s(args.from_run)
    if rate is not None and rate <= 0:
        raise ConfigError(f"info: --tokens-per-s must be positive, got {rate}")
    method = args.method
    rule = "~20 tokens/parameter" if method == "20x" else "approach 3 fit"
    print(f"  compute-optimal (Hoffmann et al. 2022, {rule})")
    if args.flops is not None:
        plan = ch.for_flops(args.flops, method)
        print(f"  FLOP budget          {plan.flops:.3g} (C = 6 N D)")
        print(f"  optimal parameters   {ch.human(plan.params)}")
        if model is not None:
            n = model.num_params()
            d = args.flops / (6 * n)
            print(f"  this model           {ch.human(n)}: {ch.human(d)} tokens fit ({d / n:.1f}/parameter)")
    else:
        plan = ch.for_params(model.num_params(), method)
        print(f"  parameters           {ch.human(plan.params)}")
    print(f"  optimal tokens       {ch.human(plan.tokens)} ({plan.tokens / plan.params:.1f}/parameter)")
    exact = ""
    if model is not None and args.flops is None:  # the plan is for this very model
        exact = f"; {model.flops_per_token(T) * plan.tokens:.3g} with attention"
    print(f"  training FLOPs       {plan.flops:.3g} (6 N D){exact}")
    print(f"  predicted loss       {plan.loss:.3f} (approach 3 fit on MassiveText; indicative only)")
    if rate:
        src = f"measured in {args.from_run}" if args.from_run else "given"
        took = ch.duration(plan.train_seconds(rate))
        print(f"  training time        {took} at {rate:,.0f} tokens/s ({src})")
    else:
        print("  training time        give --tokens-per-s N or --from-run RUN_DIR")
