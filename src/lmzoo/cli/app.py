"""The ``lmzoo`` command line: each subcommand parses arguments and calls a library function.

Errors a user can cause are one line on stderr (``lmzoo: error: ...``) with exit code 2, never a
traceback. Settings come from an optional YAML recipe (``--config``) and ``--key=value``
overrides, checked against the typed config (an unknown key names the closest ones).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmzoo.cli.bench import add_bench_parser
from lmzoo.cli.convert import add_convert_parsers
from lmzoo.cli.info import cmd_info
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.formats.atomic import REMEDY


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog.split()[-1]
        raise ConfigError(message if sub == "lmzoo" else f"{sub}: {message}")


def _train_config(args: argparse.Namespace, extra: list[str]):
    from lmzoo.config import parse_overrides, read_yaml
    from lmzoo.train.config import TrainConfig, split_overrides

    settings = read_yaml(args.config) if args.config else {}
    if "model" in settings and isinstance(settings["model"], dict):
        raise ConfigError(f"{args.config}: 'model' must be a preset name; put overrides under model_args")
    overrides = split_overrides(parse_overrides(extra))
    if args.resume:
        overrides["resume"] = True
    if getattr(args, "profile", False):
        overrides["profile"] = True
    merged = {**settings, **{k: v for k, v in overrides.items() if k != "model_args"}}
    for where, d in ((args.config, settings), ("--model_args", overrides)):  # a value of another type
        if d.get("model_args") is not None and not isinstance(d["model_args"], dict):
            raise ConfigError(f"{where}: model_args must be a mapping of preset overrides, got {d['model_args']!r}")
    if "model_args" in overrides or "model_args" in settings:
        merged["model_args"] = {**(settings.get("model_args") or {}), **overrides.get("model_args", {})}
    return TrainConfig.from_dict(merged)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.train import Trainer

    cfg = _train_config(args, extra)
    if args.nproc != 1:  # re-run under torchrun with N workers (cli_dist.py)
        from lmzoo.cli.dist import launch

        return launch(args, extra, cfg)
    trainer = Trainer(cfg)
    mcfg = trainer.model.config
    print(
        f"model {cfg.model}: {trainer.model.num_params():,} parameters, {mcfg.n_layer} layers, "
        f"context {trainer.block_size}; data {trainer.data_dir} ({trainer.meta['train_tokens']:,} train tokens); "
        f"device {trainer.device}, {str(trainer.dtype).replace('torch.', '')}"
    )
    summary = trainer.train()
    trainer.close()  # leave the process group (after success only)
    if not trainer.dist.is_main:  # torchrun: rank 0 alone reports and samples
        return 0
    if summary["interrupted"]:
        print(f"interrupted at step {summary['step']}: checkpoint saved in {cfg.out_dir}; continue with --resume")
        return 0
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, {summary['wall_s']:.0f} s")
    print(f"checkpoint: {cfg.out_dir}  (lmzoo generate --checkpoint {cfg.out_dir} --prompt ...)")
    if cfg.sample_tokens:
        from lmzoo.decoding.generate import encode_prompt, generate

        tok = trainer.tokenizer
        try:
            prompt = encode_prompt(tok, cfg.sample_prompt)
        except LmzooError as e:  # the run is saved; only its sample cannot be drawn
            print(f"lmzoo: no sample: sample_prompt: {_one_line(str(e))}", file=sys.stderr)
            return 0
        from lmzoo.formats.checkpoint import load

        # fsdp/tp/pp: rank 0 holds only shards or a stage; sample from the gathered checkpoint
        model = load(cfg.out_dir, trainer.device) if trainer.par.sharded else trainer.model
        out = generate(model, [prompt], cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed)
        print("--- sample ---")
        print(tok.decode(prompt + out[0]))
    return 0


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.data import prepare

    if extra:
        raise ConfigError(f"prepare: unrecognized arguments: {' '.join(extra)}")
    out = prepare(
        args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, text_field=args.text_field, input=args.input, workers=args.workers,
    )
    from lmzoo.data import load_meta

    meta = load_meta(out)
    print(
        f"prepared {out}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} val tokens"
    )
    return 0


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.common import resolve_device
    from lmzoo.decoding.generate import check_sampling, encode_prompt, stream
    from lmzoo.formats.load import load_any

    if extra:
        raise ConfigError(f"generate: unrecognized arguments: {' '.join(extra)}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    if args.seed is not None:
        try:  # sample i draws with seed + i
            check_sampling(0, seed=args.seed + args.num_samples - 1)
        except ConfigError as e:
            raise ConfigError(f"--seed plus --num-samples - 1: {e}") from None
    device = resolve_device(args.device)
    model, tok = load_any(args.checkpoint, device=str(device))
    if tok is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer saved with the checkpoint")
    prompt = encode_prompt(tok, args.prompt)  # unknown characters: one error line naming them (exit 2)
    stops = []
    if tok.eos_id is not None:
        stops.append(tok.eos_id)
    if args.stop:
        stop_ids = tok.encode(args.stop)
        if len(stop_ids) != 1:
            raise ConfigError(f"--stop must be a single token in this tokenizer, {args.stop!r} is {len(stop_ids)}")
        stops += stop_ids
    n_new = args.max_new_tokens
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        # checked (settings, memory for the cache) when called: an error comes before any output
        tokens = stream(
            model, [prompt], n_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            stop_tokens=stops, seed=seed,
        )
        text_so_far = tok.decode(prompt)
        sys.stdout.write(text_so_far)
        sys.stdout.flush()
        new: list[int] = []
        for toks in tokens:
            t = int(toks[0])
            if t in stops:
                break
            new.append(t)
            text = tok.decode(prompt + new)  # decode the whole so multi-byte characters print whole
            if text.startswith(text_so_far) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(text_so_far):])
                sys.stdout.flush()
                text_so_far = text
        text = tok.decode(prompt + new)
        sys.stdout.write(text[len(text_so_far):] if text.startswith(text_so_far) else "")
        sys.stdout.write("\n" + ("---\n" if i + 1 < args.num_samples else ""))
        sys.stdout.flush()
    return 0


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.peft.finetune import finetune

    cfg = _train_config(args, extra)  # TrainConfig fields as --key=value (data, steps, lr, out_dir...)
    summary = finetune(
        args.base, method=args.method, target=args.target, r=args.r, alpha=args.alpha, dropout=args.dropout,
        freeze=args.freeze, adapter=args.adapter, instruct=args.instruct, instruct_val=args.instruct_val,
        packing=not args.no_packing, teacher=args.teacher, kd_alpha=args.kd_alpha, temperature=args.temperature,
        **cfg.to_dict(),
    )
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, {summary['trainable']:,} trainable")
    if "adapter_dir" in summary:
        print(f"adapter: {summary['adapter_dir']}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.train.plot import plot_runs

    if extra:
        raise ConfigError(f"plot: unrecognized arguments: {' '.join(extra)}")
    out = plot_runs(args.runs, args.out, x=args.x, smooth=args.smooth, log_y=args.log_y, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_scale(args: argparse.Namespace, extra: list[str]) -> int:
    """A small scaling-law sweep, the approach-3 fit and its plot (docs/scaling-laws.md)."""
    import json

    from lmzoo.data import load_meta, prepare
    from lmzoo.evaluation.scaling import dial_params, fit_scaling_law, isoflop_plan, plot_fit, run_sweep

    if extra:
        raise ConfigError(f"scale: unrecognized arguments: {' '.join(extra)}")
    if min(args.depths) < 1 or min(args.steps) < 1 or args.flops <= 0 or (args.budgets and min(args.budgets) <= 0):
        raise ConfigError("scale: depths, steps and FLOP budgets must be positive")
    data = Path(args.out) / "data"
    plan = None
    if args.budgets:  # IsoFLOP: per budget, each depth gets the steps that spend it
        if not (data / "meta.json").is_file():
            prepare(args.source, data, tokenizer=args.tokenizer, progress=False)
        vocab = load_meta(data)["vocab_size"]
        params = {d: dial_params(d, vocab, args.block_size, args.aspect, args.head_dim) for d in args.depths}
        tps = args.batch_size * args.block_size
        plan = [(r["depth"], r["steps"]) for r in isoflop_plan(args.budgets, params, tps, args.min_steps)]
    n_runs = len(plan) if plan is not None else len(args.depths) * len(args.steps)
    if n_runs < 5:  # before any training: the fit has 5 unknowns
        raise ConfigError(f"scale: the fit needs >= 5 runs, this sweep has {n_runs} (add depths, steps or budgets; "
                          "IsoFLOP runs under --min-steps are left out)")
    runs = run_sweep(args.source, args.out, args.depths, args.steps, args.aspect, args.head_dim, args.batch_size,
                     args.block_size, tokenizer=args.tokenizer, log=lambda r: print(json.dumps(r), flush=True),
                     plan=plan, data_dir=str(data))
    ns, ds, ls = ([r[k] for r in runs] for k in ("params", "tokens", "val_loss"))
    fit = fit_scaling_law(ns, ds, ls)
    n_opt, d_opt = fit.optimal(args.flops)
    print(f"L(N, D) = {fit.E:.3f} + {fit.A:.4g} / N^{fit.alpha:.3f} + {fit.B:.4g} / D^{fit.beta:.3f}")
    print(f"compute-optimal at {args.flops:.3g} FLOPs: {float(n_opt):,.0f} parameters, {float(d_opt):,.0f} tokens")
    fit_json = Path(args.fit_json or Path(args.out) / "fit.json")
    fit_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = fit_json.with_name(fit_json.name + ".tmp")
    tmp.write_text(json.dumps({**fit.summary((args.flops,)), "runs": runs}, indent=1) + "\n")
    tmp.replace(fit_json)  # atomic: a reader never sees half a file
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_fit(fit, ns, ds, ls, args.plot, budgets=args.budgets)
    print(f"wrote {fit_json} and {args.plot}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from lmzoo.common import resolve_device
    from lmzoo.evaluation import evaluate as ev
    from lmzoo.formats.load import load_any

    if extra:
        raise ConfigError(f"eval: unrecognized arguments: {' '.join(extra)}")
    if not (args.data_dir or args.text or args.task):
        raise ConfigError("eval: give --data-dir DIR (with --split), --text FILE or --task FILE.jsonl")
    ev.check_eval_settings(args.batch_size, args.block_size, args.max_tokens, args.limit)  # before loading
    model, tok = load_any(args.checkpoint, device=str(resolve_device(args.device)))
    results: dict = {"checkpoint": args.checkpoint}
    if args.data_dir:
        r = ev.evaluate_split(model, args.data_dir, args.split, args.block_size, args.batch_size, args.max_tokens)
        results[f"{args.data_dir}:{args.split}"] = r.to_dict()
    if args.text:
        if not Path(args.text).is_file():
            raise ConfigError(f"eval: no such text file: {args.text}")
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        results[args.text] = ev.evaluate_text(model, tok, text, args.block_size, args.batch_size).to_dict()
    if args.task:
        mc = ev.evaluate_choices(model, tok, args.task, args.limit, args.block_size)
        if not args.predictions:
            mc.pop("predictions")
        results[args.task] = mc
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, r in results.items():
        if name == "checkpoint":
            continue
        if "acc" in r:
            print(f"{name}: {r['examples']} examples, acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f}")
        else:
            print(f"{name}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}, bits/byte "
                  f"{r['bits_per_byte']:.4f} ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
    return 0


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    import shlex

    from lmzoo.config import parse_overrides
    from lmzoo.evaluation.compare import compare, load_experiment, parse_run
    from lmzoo.train.config import split_overrides

    budget = None
    if args.budget:
        kind, _, amount = args.budget.partition("=")
        budget = {kind: parse_overrides([f"--v={amount}"])["v"]}
    exp = load_experiment(
        args.config, runs=[parse_run(r) for r in args.run] or None, budget=budget, out_dir=args.out,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None, target_loss=args.target_loss,
        common=split_overrides(parse_overrides(extra)) or None,
    )
    table = compare(exp, command="lmzoo " + shlex.join(sys.argv[1:]))
    from lmzoo.evaluation.compare import table_markdown

    print(table_markdown(table), end="")
    print(f"wrote {exp['out_dir']}/table.md, table.json and val_loss_vs_{{tokens,time,flops}}.png")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.evaluation.report import export, write_report

    if extra:
        raise ConfigError(f"report: unrecognized arguments: {' '.join(extra)}")
    dirs = [export(d, args.export) for d in args.dirs] if args.export else args.dirs
    print(f"wrote {write_report(dirs, args.out)}")
    return 0


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.common import resolve_device
    from lmzoo.decoding.generate import check_sampling
    from lmzoo.formats.load import load_any
    from lmzoo.serving.chat import ChatSession, run_chat

    if extra:
        raise ConfigError(f"chat: unrecognized arguments: {' '.join(extra)}")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    model, tok = load_any(args.checkpoint, device=str(resolve_device(args.device)))
    if tok is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer saved with the checkpoint")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    session = ChatSession(model, tok, system=args.system, template=args.template,
                          max_new_tokens=args.max_new_tokens, sampling=sampling)
    return run_chat(session)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.serving.serve import serve

    if extra:
        raise ConfigError(f"serve: unrecognized arguments: {' '.join(extra)}")
    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, model_name=args.model_name,
          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes, template=args.template,
          read_timeout_s=args.read_timeout, max_connections=args.max_connections, api_key=args.api_key,
          allowed_hosts=args.allowed_host, queue_size=args.queue_size, max_request_tokens=args.max_request_tokens,
          stall_timeout_s=args.stall_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmzoo", description="Train, fine-tune and compare language-model architectures.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a model (no arguments: a small char-level model on the built-in corpus)",
        description="Train a model. Settings: --config recipe.yaml plus --key=value overrides "
        "(e.g. --max_steps=500 --model=gpt2-char-cpu --model.n_layer=6). Keys are TrainConfig fields.",
    )
    t.add_argument("--config", help="YAML recipe of TrainConfig fields")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    t.add_argument("--profile", action="store_true", help="record a torch.profiler trace of a few steps")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine, started with torchrun "
                   "(with --parallel.mode=ddp|fsdp|tp|pp; docs/distributed.md)")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token files")
    pr.add_argument("source", nargs="?", default="stdlib", help="stdlib, shakespeare, a hub data set, or a path")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--tokenizer", default="char", help="byte, char, bpe, or a tokenizer directory")
    pr.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    pr.add_argument("--val-fraction", type=float, default=0.1)
    pr.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet/data sets")
    pr.add_argument("--input", default=None, help="local file for a built-in corpus that would be downloaded")
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    pr.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="sample text from a checkpoint (streamed)")
    g.add_argument("--checkpoint", required=True, help="checkpoint or run, HF directory, GGUF file, or a model name")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--stop", default=None, help="a stop string (one token)")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "info",
        help="parameters, FLOPs/token and memory of a preset or checkpoint",
        description="Describe a preset (with --key=value overrides) or a checkpoint.",
    )
    i.add_argument("preset", nargs="?")
    i.add_argument("--checkpoint", default=None)
    i.add_argument("--seq-len", type=int, default=None)
    i.add_argument("--list", action="store_true", help="list the presets")
    i.add_argument("--chinchilla", action="store_true", help="compute-optimal tokens (Hoffmann et al. 2022)")
    i.add_argument("--flops", type=float, default=None, help="a FLOP budget: compute-optimal N and D for it")
    i.add_argument("--method", choices=["20x", "approach3"], default="20x",
                   help="20 tokens/parameter (default) or the paper's approach-3 loss fit")
    i.add_argument("--tokens-per-s", type=float, default=None, help="throughput for the time estimate")
    i.add_argument("--from-run", default=None, help="read the throughput from a run's metrics.jsonl")
    i.add_argument("--nf4", action="store_true", help="also show the weight memory in NF4 (QLoRA)")
    i.set_defaults(func=cmd_info)

    f = sub.add_parser(
        "finetune", help="fine-tune a checkpoint or HF directory: full, LoRA, QLoRA; instruction data; distillation",
        description="Fine-tune with the shared trainer; TrainConfig fields as --key=value (e.g. --source=my.txt "
        "--tokenizer=DIR --max_steps=200 --lr=2e-4 --out_dir=runs/ft). LoRA adapters go to <out_dir>/adapter. "
        "docs/lora.md, docs/instruction-tuning.md, docs/distillation.md.",
    )
    f.add_argument("base", help="lmzoo checkpoint / run directory, a Hugging Face directory, or a preset (a fresh "
                   "model, e.g. a student for --teacher)")
    f.add_argument("--method", choices=["full", "lora", "qlora"], default=None,
                   help="default: lora for a directory, full for a preset")
    f.add_argument("--instruct", default=None, help="instruction JSONL (prompt/response or messages): loss on the "
                   "responses only, examples packed into block_size rows")
    f.add_argument("--instruct-val", default=None, help="validation JSONL (default: the last 10%% of --instruct)")
    f.add_argument("--no-packing", action="store_true", help="one instruction example per row (no attention "
                   "across examples, at the cost of padding)")
    f.add_argument("--teacher", default=None, help="distill from this checkpoint / HF directory (same tokenizer)")
    f.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the data CE; 1 - it weighs T^2 * KL")
    f.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    f.add_argument("--target", default="attn.qkv|attn.proj", help="regex of the Linear module names to adapt")
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/r)")
    f.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter's input")
    f.add_argument("--freeze", default=None, help="regex of parameter names kept frozen (e.g. '^wte\\.')")
    f.add_argument("--adapter", default=None, help="start from a saved adapter directory")
    f.add_argument("--config", help="YAML recipe of TrainConfig fields")
    f.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    f.set_defaults(func=cmd_finetune)

    pl = sub.add_parser("plot", help="loss curves of one or several runs into a PNG")
    pl.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    pl.add_argument("--out", default="loss.png", help="output PNG")
    pl.add_argument("--x", choices=["step", "tokens", "time"], default="step", help="x axis")
    pl.add_argument("--smooth", type=float, default=0.9, help="EMA smoothing of the train loss, in [0, 1)")
    pl.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)

    # scaling-law sweep (lmzoo.evaluation.scaling)
    sc = sub.add_parser("scale", help="sweep model sizes x token budgets, fit L(N, D), plot the frontier")
    sc.add_argument("--source", default="stdlib", help="corpus (built-in name or path)")
    sc.add_argument("--tokenizer", default="char")
    sc.add_argument("--out", default="runs/scale", help="directory for the sweep's runs")
    sc.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="depth dial values (model sizes)")
    sc.add_argument("--steps", type=int, nargs="+", default=[40, 80, 160], help="steps per run (token budgets)")
    sc.add_argument("--aspect", type=int, default=32, help="width per layer of depth")
    sc.add_argument("--head-dim", type=int, default=16)
    sc.add_argument("--batch-size", type=int, default=8)
    sc.add_argument("--block-size", type=int, default=64)
    sc.add_argument("--flops", type=float, default=1e15, help="budget to print the compute-optimal size for")
    sc.add_argument("--budgets", type=float, nargs="+", help="IsoFLOP budgets C = 6ND (replace --steps)")
    sc.add_argument("--min-steps", type=int, default=50, help="IsoFLOP: leave out runs shorter than this")
    sc.add_argument("--plot", default="scaling.png", help="output PNG")
    sc.add_argument("--fit-json", default=None, help="the fit and frontier as JSON (default: OUT/fit.json)")
    sc.set_defaults(func=cmd_scale)

    ev = sub.add_parser("eval", help="perplexity, bits per byte and multiple-choice accuracy of a checkpoint",
                        description="Evaluate a checkpoint (docs/evaluation.md).")
    ev.add_argument("--checkpoint", required=True, help="checkpoint or run, HF directory, GGUF file, or a model name")
    ev.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="a prepared data set")
    ev.add_argument("--split", default="val", help="train or val")
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate only the split's first N tokens")
    ev.add_argument("--text", default=None, help="a UTF-8 text file")
    ev.add_argument("--task", default=None, help="multiple-choice JSONL (context/ctx, endings, label)")
    ev.add_argument("--limit", type=int, default=None, help="score only the task's first N examples")
    ev.add_argument("--predictions", action="store_true", help="with --json: every example's scores")
    ev.add_argument("--block-size", type=int, default=None, help="window length (default: the model's)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=cmd_eval)

    cp = sub.add_parser("compare", help="train several models under one budget; table and plots",
                        description="Compare models on the same data and budget (docs/compare.md). Extra "
                        "--key=value settings apply to every run.")
    cp.add_argument("--config", default=None, help="experiment YAML (runs, budget, seeds, common settings)")
    cp.add_argument("--run", action="append", default=[], help="name:preset[:key=value,...] (repeatable)")
    cp.add_argument("--budget", default=None, help="steps=N, tokens=N, flops=F or time_s=S (default steps=200)")
    cp.add_argument("--seeds", default=None, help="comma-separated seeds (default 1337)")
    cp.add_argument("--target-loss", type=float, default=None, help="report time and tokens to reach it")
    cp.add_argument("--out", default=None, help="output directory (default runs/compare/<name>)")
    cp.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", help="render RESULTS.md from `lmzoo compare` outputs",
                        description="Render the experiment log from compare output directories (docs/compare.md).")
    rp.add_argument("dirs", nargs="+", help="experiment directories (compare outputs or results/<name>)")
    rp.add_argument("--out", default="RESULTS.md")
    rp.add_argument("--export", default=None, metavar="DIR",
                    help="first copy each experiment's summaries to DIR/<name>/ and render from there")
    rp.set_defaults(func=cmd_report)

    ch = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed; /reset, /exit)",
                        description="Interactive chat with history and streaming (docs/serve.md).")
    ch.add_argument("--checkpoint", required=True, help="checkpoint or run, HF directory, GGUF file, or a model name")
    ch.add_argument("--system", default=None, help="a system prompt put before the conversation")
    ch.add_argument("--template", choices=["auto", "model", "transcript", "raw"], default="auto",
                    help="auto: the model's own chat template if it has one, else transcript; model: its own; "
                    "transcript: 'User: ... / Assistant: ...' turns; raw: plain text continuation")
    ch.add_argument("--max-new-tokens", type=int, default=200)
    ch.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ch.add_argument("--top-k", type=int, default=None)
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP endpoint (needs lmzoo[serve])",
                        description="Serve a checkpoint: /v1/completions, /v1/chat/completions (docs/serve.md).")
    sv.add_argument("--checkpoint", required=True, help="checkpoint or run, HF directory, GGUF file, or a model name")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", default=None,
                    help="the model id clients use (default: the checkpoint's name); other names get a 404")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1 requests (or set LMZOO_API_KEY)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host name to serve besides the bound address (repeatable; '*': any)")
    sv.add_argument("--max-tokens-limit", type=int, default=512, help="larger max_tokens get a 400")
    sv.add_argument("--max-request-tokens", type=int, default=None,
                    help="cap on prompts x n x max_tokens per request (default 4 x --max-tokens-limit); over: 400")
    sv.add_argument("--queue-size", type=int, default=128,
                    help="generations that may wait for the model; beyond: 503 with Retry-After")
    sv.add_argument("--stall-timeout", type=float, default=60.0,
                    help="seconds without a new token before /health reports the generation stalled")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get a 413")
    sv.add_argument("--template", choices=["transcript", "raw"], default="transcript", help="chat formatting")
    sv.add_argument("--read-timeout", type=float, default=10.0, help="seconds to send headers, and the body")
    sv.add_argument("--max-connections", type=int, default=1024, help="beyond this many at once: 503")
    sv.add_argument("--device", default="auto")
    sv.set_defaults(func=cmd_serve)
    add_bench_parser(sub)  # lmzoo bench train|generate (cli_bench.py, docs/performance.md)
    add_convert_parsers(sub)  # lmzoo convert, lmzoo merge-lora (cli/convert.py)
    return p


def _one_line(msg: str) -> str:
    """One line whatever a message holds (a user's value may carry \\r, \\x85, ...): control characters escaped."""
    msg = msg.strip().replace("\n", " ")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in msg)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
        if bad:
            raise ConfigError(f"unrecognized argument {bad[0]!r} (settings are written --key=value)")
        return args.func(args, extra)
    except LmzooError as e:
        msg = _one_line(str(e))
        print(f"lmzoo: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmzoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os._exit(0)
    except OSError as e:  # disk full, permission denied, ...: one line, the previous state is intact
        where = f" ({str(e.filename)[:200]})" if e.filename else ""
        # what to do about it, unless the message already says (the trainer's names the intact checkpoint)
        remedy = f"; {REMEDY[e.errno]}" if e.filename and e.errno in REMEDY else ""
        print(f"lmzoo: error: {_one_line(str(e.strerror or e) + where + remedy)}", file=sys.stderr)
        # a path the user gave that cannot be one (too long, a file where a directory belongs): a usage error
        return 2 if e.errno in (errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL) else 1


if __name__ == "__main__":
    sys.exit(main())
