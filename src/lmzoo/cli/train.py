"""``lmzoo train``, ``prepare``, ``finetune``, ``compare``, ``scale``, ``plot`` and ``report``: the verbs that make
runs and read them back. Settings are :class:`~lmzoo.train.TrainConfig` fields (``--max_steps 500``, a YAML
recipe with ``--config``), made options by :mod:`lmzoo.cli.options`; run directories follow
:mod:`lmzoo.train.rundir` (never into another run, a default one of its own, resume restores the run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from lmzoo.cli.options import DOTTED, add_config_options, given_settings, one_line
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.train.config import TrainConfig

SETTINGS_USAGE = "[--SETTING VALUE ...] [--model.FIELD VALUE ...]"


def train_settings(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """The settings given: the ``--config`` recipe, then the command line's (mappings merged key by key)."""
    from lmzoo.config import read_yaml

    recipe = read_yaml(args.config) if args.config else {}
    if "model" in recipe and isinstance(recipe["model"], dict):
        raise ConfigError(f"{args.config}: 'model' must be a preset name; put overrides under model_args")
    given = given_settings(args, TrainConfig, extra)
    merged = {**recipe, **given}
    for field in DOTTED.values():  # --model.n_layer=6 adds to the recipe's model_args instead of replacing them
        for where, d in ((args.config, recipe), (f"--{field}", given)):
            if d.get(field) is not None and not isinstance(d[field], dict):
                raise ConfigError(f"{where}: {field} must be a mapping, got {d[field]!r}")
        if field in recipe and field in given:
            merged[field] = {**(recipe[field] or {}), **given[field]}
    return merged


def _print_config(cfg: TrainConfig) -> int:
    import yaml

    print("# the settings of this run, as a recipe (lmzoo train --config FILE); out_dir null: a new "
          "runs/<model>-<time>")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.train import Trainer, rundir

    cfg = rundir.run_config(train_settings(args, extra))
    if args.print_config:
        return _print_config(cfg)
    if args.nproc != 1:  # re-run under torchrun with N workers (cli/dist.py), all writing one run directory
        from lmzoo.cli.dist import check, launch, worker_argv

        check(cfg, args.nproc)
        argv = worker_argv(args.argv)
        if cfg.out_dir is None:  # one default directory for every worker, named here
            cfg = cfg.replace(out_dir=str(rundir.default_out_dir(cfg.model)))
            rundir.claim(cfg.out_dir, link=True)
        if "out_dir" not in given_settings(args, TrainConfig):
            argv.append(f"--out_dir={cfg.out_dir}")
        return launch(args.nproc, argv)
    trainer = Trainer(cfg)
    mcfg = trainer.model.config
    print(
        f"model {cfg.model}: {trainer.model.num_params():,} parameters, {mcfg.n_layer} layers, "
        f"context {trainer.block_size}; data {trainer.data_dir} ({trainer.meta['train_tokens']:,} train tokens); "
        f"device {trainer.device}, {str(trainer.dtype).replace('torch.', '')}; run {trainer.out_dir}"
    )
    summary = trainer.train()
    trainer.close()  # leave the process group (after success only)
    if not trainer.dist.is_main:  # torchrun: rank 0 alone reports and samples
        return rundir.exit_code(trainer.stop_signal)
    out = trainer.out_dir
    if summary["interrupted"]:
        print(f"interrupted at step {summary['step']}: checkpoint saved in {out}; continue with "
              f"lmzoo train --resume --out_dir={out}")
        return rundir.exit_code(trainer.stop_signal)  # 130 (SIGINT) or 143 (SIGTERM): `train && next` stops
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, {summary['wall_s']:.0f} s")
    print(f"checkpoint: {out}  (lmzoo generate --checkpoint {out} --prompt ...)")
    if cfg.sample_tokens:
        from lmzoo.decoding.generate import encode_prompt, generate

        tok = trainer.tokenizer
        try:
            prompt = encode_prompt(tok, cfg.sample_prompt)
        except LmzooError as e:  # the run is saved; only its sample cannot be drawn
            print(f"lmzoo: no sample: sample_prompt: {one_line(str(e))}", file=sys.stderr)
            return 0
        from lmzoo.formats.checkpoint import load

        # fsdp/tp/pp: rank 0 holds only shards or a stage; sample from the gathered checkpoint
        model = load(out, trainer.device) if trainer.par.sharded else trainer.model
        sample = generate(model, [prompt], cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed)
        print("--- sample ---")
        print(tok.decode(prompt + sample[0]))
    return 0


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.data import load_meta, prepare

    out = prepare(
        args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, text_field=args.text_field, input=args.input, workers=args.workers,
    )
    meta = load_meta(out)
    print(
        f"prepared {out}: vocab {meta['vocab_size']}, {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} val tokens"
    )
    return 0


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.peft.finetune import finetune
    from lmzoo.train import rundir

    settings = train_settings(args, extra)  # TrainConfig fields (data, steps, lr, out_dir...)
    target = {"target": args.target} if args.target is not None else {}  # default: the library's
    summary = finetune(
        args.base, method=args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, freeze=args.freeze,
        adapter=args.adapter, instruct=args.instruct, instruct_val=args.instruct_val, packing=not args.no_packing,
        teacher=args.teacher, kd_alpha=args.kd_alpha, temperature=args.temperature, **target, **settings,
    )
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}: checkpoint saved in {summary['out_dir']}")
        return rundir.exit_code(summary.get("signal"))
    print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, {summary['trainable']:,} trainable")
    print(f"run: {summary['out_dir']}  (lmzoo generate --checkpoint {summary['out_dir']} --prompt ...)")
    if "adapter_dir" in summary:
        print(f"adapter: {summary['adapter_dir']}")
    return 0


def cmd_plot(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.train.plot import default_plot_path, plot_runs

    out = plot_runs(args.runs, args.out or default_plot_path(args.runs), x=args.x, smooth=args.smooth,
                    log_y=args.log_y, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_scale(args: argparse.Namespace, extra: list[str]) -> int:
    """A small scaling-law sweep, the approach-3 fit and its plot (docs/scaling-laws.md)."""
    from lmzoo.data import load_meta, prepare
    from lmzoo.evaluation.scaling import dial_params, fit_scaling_law, isoflop_plan, plot_fit, run_sweep

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
                     plan=plan, data_dir=str(data), overwrite=args.overwrite)
    ns, ds, ls = ([r[k] for r in runs] for k in ("params", "tokens", "val_loss"))
    fit = fit_scaling_law(ns, ds, ls)
    n_opt, d_opt = fit.optimal(args.flops)
    print(f"L(N, D) = {fit.E:.3f} + {fit.A:.4g} / N^{fit.alpha:.3f} + {fit.B:.4g} / D^{fit.beta:.3f}")
    print(f"compute-optimal at {args.flops:.3g} FLOPs: {float(n_opt):,.0f} parameters, {float(d_opt):,.0f} tokens")
    from lmzoo.formats.atomic import atomic_write_text

    fit_json = Path(args.fit_json or Path(args.out) / "fit.json")
    fit_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fit_json, json.dumps({**fit.summary((args.flops,)), "runs": runs}, indent=1) + "\n")
    plot = Path(args.plot or Path(args.out) / "scaling.png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_fit(fit, ns, ds, ls, plot, budgets=args.budgets)
    print(f"wrote {fit_json} and {plot}")
    return 0


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.common import smoke_mode
    from lmzoo.config import parse_overrides
    from lmzoo.evaluation.compare import compare, load_experiment, parse_run, table_markdown
    from lmzoo.train.rundir import smoke_steps

    budget = None
    if args.budget:
        kind, _, amount = args.budget.partition("=")
        budget = {kind: parse_overrides([f"--v={amount}"])["v"]}
        if smoke_mode() and kind == "steps" and isinstance(budget[kind], int):  # docs' smoke tests (rundir.py)
            budget[kind] = smoke_steps(budget[kind])
    exp = load_experiment(
        args.config, runs=[parse_run(r) for r in args.run] or None, budget=budget, out_dir=args.out,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None, target_loss=args.target_loss,
        common=given_settings(args, TrainConfig, extra) or None,
    )
    table = compare(exp, command="lmzoo " + shlex.join(sys.argv[1:]))
    print(table_markdown(table), end="")
    print(f"wrote {exp['out_dir']}/table.md, table.json and val_loss_vs_{{tokens,time,flops}}.png")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.evaluation.report import default_report_path, export, write_report

    dirs = [export(d, args.export) for d in args.dirs] if args.export else args.dirs
    print(f"wrote {write_report(dirs, args.out or default_report_path(dirs))}")
    return 0


def add_train_parsers(sub: Any) -> None:
    """Register train, prepare, finetune, plot, scale, compare and report on the ``lmzoo`` subparsers."""
    t = sub.add_parser(
        "train", usage=f"lmzoo train [--config FILE] [--resume] [--print_config] [--nproc N] {SETTINGS_USAGE}",
        help="train a model (no arguments: a small char-level model on the built-in corpus)",
        description="Train a model. Every setting below is a TrainConfig field, given as --name value (or "
        "--name=value; --name-with-hyphens works too), over an optional YAML recipe (--config). A preset's own "
        "fields are --model.FIELD value. Without --out_dir the run gets a new runs/<model>-<time> directory, "
        "linked as runs/latest; a directory holding another run is refused (--resume, --overwrite).",
    )
    t.add_argument("--config", metavar="FILE", help="YAML recipe of settings (the names below)")
    t.add_argument("--print_config", action="store_true", help="print the settings the run would use, and exit")
    t.add_argument("--nproc", type=int, default=1, metavar="N", help="processes on this machine, started with torchrun "
                   "(with --parallel.mode ddp|fsdp|tp|pp; docs/distributed.md)")
    add_config_options(t, TrainConfig)
    t.set_defaults(func=cmd_train, settings="dotted")

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token files",
                        description="Tokenize a corpus into OUT (train.bin, val.bin, tokenizer/, meta.json).")
    pr.add_argument("source", nargs="?", default=None,
                    help="stdlib, shakespeare, a file, folder or glob, .jsonl/.parquet, or owner/name (a hub data set)")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--tokenizer", default="char", help="byte, char, bpe, or a tokenizer directory")
    pr.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary size")
    pr.add_argument("--val_fraction", type=float, default=0.1, help="share of the text held out for validation")
    pr.add_argument("--text_field", default="text", help="field holding the text in JSONL/Parquet/data sets")
    pr.add_argument("--input", default=None, help="a local copy of shakespeare (no download); alone: the file to "
                    "prepare")
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    pr.set_defaults(func=cmd_prepare)

    f = sub.add_parser(
        "finetune", usage=f"lmzoo finetune BASE [--method M] [--instruct FILE] [--teacher DIR] ... {SETTINGS_USAGE}",
        help="fine-tune a checkpoint or HF directory: full, LoRA, QLoRA; instruction data; distillation",
        description="Fine-tune with the shared trainer into a run of its own (never into BASE): default "
        "runs/<family>-<method>-<time>, linked as runs/latest. Training settings are TrainConfig fields (e.g. "
        "--source my.txt --max_steps 200 --lr 2e-4); the data is tokenized with the base's tokenizer unless "
        "--tokenizer says otherwise. LoRA adapters go to <out_dir>/adapter. docs/lora.md, "
        "docs/instruction-tuning.md, docs/distillation.md.",
    )
    f.add_argument("base", help="lmzoo checkpoint / run directory, a Hugging Face directory, or a preset (a fresh "
                   "model, e.g. a student for --teacher)")
    f.add_argument("--method", choices=["full", "lora", "qlora"], default=None,
                   help="default: lora for a directory, full for a preset")
    f.add_argument("--instruct", default=None, help="instruction JSONL (prompt/response or messages): loss on the "
                   "responses only, examples packed into block_size rows")
    f.add_argument("--instruct_val", default=None, help="validation JSONL (default: the last 10%% of --instruct)")
    f.add_argument("--no_packing", action="store_true", help="one instruction example per row (no attention "
                   "across examples, at the cost of padding)")
    f.add_argument("--teacher", default=None, help="distill from this checkpoint / HF directory (same tokenizer)")
    f.add_argument("--kd_alpha", type=float, default=0.5, help="weight of the data CE; 1 - it weighs T^2 * KL")
    f.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    f.add_argument("--target", default=None, help="regex of the Linear module names to adapt (default: the "
                   "attention's)")
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/r)")
    f.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter's input")
    f.add_argument("--freeze", default=None, help="regex of parameter names kept frozen (e.g. '^wte\\.')")
    f.add_argument("--adapter", default=None, help="start from a saved adapter directory")
    f.add_argument("--config", metavar="FILE", help="YAML recipe of settings (the names below)")
    add_config_options(f, TrainConfig)
    f.set_defaults(func=cmd_finetune, settings="dotted")

    pl = sub.add_parser("plot", help="loss curves of one or several runs into a PNG")
    pl.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    pl.add_argument("--out", default=None, help="output PNG (default: loss.png in the first run directory)")
    pl.add_argument("--x", choices=["step", "tokens", "time"], default="step", help="x axis")
    pl.add_argument("--smooth", type=float, default=0.9, help="EMA smoothing of the train loss, in [0, 1)")
    pl.add_argument("--log_y", action="store_true", help="logarithmic loss axis")
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=cmd_plot)

    sc = sub.add_parser("scale", help="sweep model sizes x token budgets, fit L(N, D), plot the frontier")
    sc.add_argument("--source", default="stdlib", help="corpus (built-in name or path)")
    sc.add_argument("--tokenizer", default="char")
    sc.add_argument("--out", default="runs/scale", help="directory for the sweep's runs, fit and plot")
    sc.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier sweep in --out")
    sc.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="depth dial values (model sizes)")
    sc.add_argument("--steps", type=int, nargs="+", default=[40, 80, 160], help="steps per run (token budgets)")
    sc.add_argument("--aspect", type=int, default=32, help="width per layer of depth")
    sc.add_argument("--head_dim", type=int, default=16)
    sc.add_argument("--batch_size", type=int, default=8)
    sc.add_argument("--block_size", type=int, default=64)
    sc.add_argument("--flops", type=float, default=1e15, help="budget to print the compute-optimal size for")
    sc.add_argument("--budgets", type=float, nargs="+", help="IsoFLOP budgets C = 6ND (replace --steps)")
    sc.add_argument("--min_steps", type=int, default=50, help="IsoFLOP: leave out runs shorter than this")
    sc.add_argument("--plot", default=None, help="output PNG (default: OUT/scaling.png)")
    sc.add_argument("--fit_json", default=None, help="the fit and frontier as JSON (default: OUT/fit.json)")
    sc.set_defaults(func=cmd_scale)

    cp = sub.add_parser(
        "compare", usage=f"lmzoo compare [--config FILE] [--run NAME:PRESET ...] [--budget KIND=N] {SETTINGS_USAGE}",
        help="train several models under one budget; table and plots",
        description="Compare models on the same data and budget (docs/compare.md). Training settings (below) "
        "apply to every run.")
    cp.add_argument("--config", default=None, help="experiment YAML (runs, budget, seeds, common settings)")
    cp.add_argument("--run", action="append", default=[], help="name:preset[:key=value,...] (repeatable)")
    cp.add_argument("--budget", default=None, help="steps=N, tokens=N, flops=F or time_s=S (default steps=200)")
    cp.add_argument("--seeds", default=None, help="comma-separated seeds (default 1337)")
    cp.add_argument("--target_loss", type=float, default=None, help="report time and tokens to reach it")
    cp.add_argument("--out", default=None, help="output directory (default runs/compare/<name>)")
    add_config_options(cp, TrainConfig, skip=("out_dir", "resume", "overwrite", "seed"))
    cp.set_defaults(func=cmd_compare, settings="dotted")

    rp = sub.add_parser("report", help="render an experiment log (like RESULTS.md) from `lmzoo compare` outputs",
                        description="Render the experiment log from compare output directories (docs/compare.md).")
    rp.add_argument("dirs", nargs="+", help="experiment directories (compare outputs or results/<name>)")
    rp.add_argument("--out", default=None, help="the Markdown file to write (default: report.md in the one "
                    "experiment directory given; several need --out)")
    rp.add_argument("--export", default=None, metavar="DIR",
                    help="first copy each experiment's summaries to DIR/<name>/ and render from there")
    rp.set_defaults(func=cmd_report)
