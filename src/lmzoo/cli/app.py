"""The ``lmzoo`` command line: the parser, the dispatch, and the verbs that use a model (generate, eval,
chat, serve); :mod:`.train` holds the verbs that make runs, :mod:`.info` and :mod:`.bench` their own.

One convention for every verb (:mod:`.options`): ``--name value`` or ``--name=value``, names spelled with
underscores as in the configs (hyphens accepted), ``--help`` listing every setting. Errors a user can cause
are one line on stderr (``lmzoo: error: ...``) with exit code 2, never a traceback; the exit codes are
tabled in docs/cli.md.
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
from lmzoo.cli.options import (
    DOTTED,
    Parser,
    canonical_argv,
    canonicalize,
    one_line,
    parser_for,
    unknown_option_error,
)
from lmzoo.cli.train import add_train_parsers
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.formats.atomic import REMEDY


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.common import resolve_device, resolve_dtype
    from lmzoo.decoding.generate import check_sampling, encode_prompt, stream
    from lmzoo.formats.load import load_any

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    if args.seed is not None:
        try:  # sample i draws with seed + i
            check_sampling(0, seed=args.seed + args.num_samples - 1)
        except ConfigError as e:
            raise ConfigError(f"--seed plus --num-samples - 1: {e}") from None
    device = resolve_device(args.device)
    model, tok = load_any(args.checkpoint, device=str(device), dtype=resolve_dtype(args.dtype), quantize=args.quantize)
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


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from lmzoo.common import resolve_device
    from lmzoo.evaluation import evaluate as ev
    from lmzoo.formats.load import load_any

    if not (args.data_dir or args.text or args.task):
        raise ConfigError("eval: give --data-dir DIR (with --split), --text FILE or --task FILE.jsonl")
    ev.check_eval_settings(args.batch_size, args.block_size, args.max_tokens, args.limit)  # before loading
    model, tok = load_any(args.checkpoint, device=str(resolve_device(args.device)))
    results: dict = {"checkpoint": args.checkpoint}
    if args.data_dir:
        r = ev.evaluate_split(model, args.data_dir, args.split, args.block_size, args.batch_size, args.max_tokens,
                              progress=args.progress)
        results[f"{args.data_dir}:{args.split}"] = r.to_dict()
    if args.text:
        if not Path(args.text).is_file():
            raise ConfigError(f"eval: no such text file: {args.text}")
        text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        results[args.text] = ev.evaluate_text(model, tok, text, args.block_size, args.batch_size,
                                              progress=args.progress).to_dict()
    if args.task:
        mc = ev.evaluate_choices(model, tok, args.task, args.limit, args.block_size, progress=args.progress)
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


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.common import resolve_device, resolve_dtype
    from lmzoo.decoding.generate import check_sampling
    from lmzoo.formats.load import load_any
    from lmzoo.serving.chat import ChatSession, run_chat

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    model, tok = load_any(args.checkpoint, device=str(resolve_device(args.device)), dtype=resolve_dtype(args.dtype),
                          quantize=args.quantize)
    if tok is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer saved with the checkpoint")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    session = ChatSession(model, tok, system=args.system, template=args.template,
                          max_new_tokens=args.max_new_tokens, sampling=sampling)
    return run_chat(session)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.serving.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, device=args.device, model_name=args.model_name,
          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes, template=args.template,
          read_timeout_s=args.read_timeout, max_connections=args.max_connections, api_key=args.api_key,
          allowed_hosts=args.allowed_host, queue_size=args.queue_size, max_request_tokens=args.max_request_tokens,
          stall_timeout_s=args.stall_timeout)
    return 0


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    """The model a verb uses, named either way: ``lmzoo chat smollm2-135m-instruct`` or ``--checkpoint`` it."""
    what = "checkpoint or run, HF directory, GGUF file, or a model name (lmzoo info --list)"
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help=f"{what}; or --checkpoint")
    p.add_argument("--checkpoint", default=None, help=what)


def checkpoint_argument(args: argparse.Namespace) -> None:
    """``args.checkpoint`` from MODEL or --checkpoint (a verb of :func:`add_checkpoint`): exactly one given."""
    if not hasattr(args, "model_arg"):
        return
    given = [v for v in (args.model_arg, args.checkpoint) if v is not None]
    if not given:
        raise ConfigError(f"{args.command}: which model? lmzoo {args.command} MODEL (a checkpoint, run, HF "
                          "directory, GGUF file or a name from `lmzoo info --list`), or --checkpoint MODEL")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"{args.command}: two models given ({given[0]} and --checkpoint {given[1]}); give one")
    args.checkpoint = given[0]


def add_load_options(p: argparse.ArgumentParser) -> None:
    """How a verb that decodes loads its model: the weights' dtype and an optional quantization."""
    p.add_argument("--dtype", default=None,
                   help="load the weights in this dtype: float32, bfloat16 (bf16), float16 (default: as stored)")
    p.add_argument("--quantize", default=None, choices=("int8",),
                   help="int8 weight-only linears and head: fewer bytes per token when decoding on a CPU")


def build_parser() -> argparse.ArgumentParser:
    import platform

    import torch

    from lmzoo import __version__

    p = Parser(prog="lmzoo", description="Train, fine-tune and compare language-model architectures. Every "
               "option is written --name value or --name=value (docs/cli.md); `lmzoo VERB --help` lists them.")
    p.add_argument("--version", action="version",
                   version=f"lmzoo {__version__} (torch {torch.__version__}, Python {platform.python_version()})")
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="VERB")
    add_train_parsers(sub)  # train, prepare, finetune, plot, scale, compare, report (cli/train.py)

    g = sub.add_parser("generate", help="sample text from a checkpoint (streamed)")
    add_checkpoint(g)
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--stop", default=None, help="a stop string (one token)")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")
    add_load_options(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "info",
        help="parameters, FLOPs/token and memory of a preset or checkpoint",
        description="Describe a preset (its fields overridden with --model.FIELD value) or a checkpoint.",
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
    i.set_defaults(func=cmd_info, settings="model")

    ev = sub.add_parser("eval", help="perplexity, bits per byte and multiple-choice accuracy of a checkpoint",
                        description="Evaluate a checkpoint (docs/evaluation.md).")
    add_checkpoint(ev)
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
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="a progress bar on stderr for inputs longer than a few batches (default on)")
    ev.set_defaults(func=cmd_eval)

    ch = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed; /reset, /exit)",
                        description="Interactive chat with history and streaming (docs/serve.md).")
    add_checkpoint(ch)
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
    add_load_options(ch)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP endpoint (needs lmzoo[serve])",
                        description="Serve a checkpoint: /v1/completions, /v1/chat/completions (docs/serve.md).")
    add_checkpoint(sv)
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
    sv.add_argument("--template", choices=["auto", "model", "transcript", "raw"], default="auto",
                    help="how /v1/chat/completions writes a conversation: as for `lmzoo chat --template`")
    sv.add_argument("--read-timeout", type=float, default=10.0, help="seconds to send headers, and the body")
    sv.add_argument("--max-connections", type=int, default=1024, help="beyond this many at once: 503")
    sv.add_argument("--device", default="auto")
    sv.set_defaults(func=cmd_serve)
    add_bench_parser(sub)  # lmzoo bench train|generate (cli_bench.py, docs/performance.md)
    add_convert_parsers(sub)  # lmzoo convert, lmzoo merge-lora (cli/convert.py)
    return canonicalize(p)  # one spelling of every option: --max_new_tokens (--max-new-tokens is read too)


def _check_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], extra: list[str]) -> None:
    """Arguments the verb's parser did not take: dotted settings (``--model.n_layer=6``) where the verb has
    settings, a preset's fields (``info``, ``bench``), anything else one line naming the closest options."""
    kind = getattr(args, "settings", None)
    if kind == "dotted":
        bad = [a for a in extra if not (a.startswith("--") and "=" in a and a[2:].split(".", 1)[0] in DOTTED
                                         and "." in a.split("=", 1)[0])]
    elif kind == "model":
        bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    else:
        bad = extra
    if bad:
        raise unknown_option_error(parser_for(parser, argv), bad)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        argv = canonical_argv(parser, argv)  # --max-steps and --max_steps are one option
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _check_extra(parser, args, argv, extra)
        checkpoint_argument(args)
        args.argv = argv
        return args.func(args, extra)
    except LmzooError as e:
        print(f"lmzoo: error: {one_line(str(e))}", file=sys.stderr)
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
        print(f"lmzoo: error: {one_line(str(e.strerror or e) + where + remedy)}", file=sys.stderr)
        # a path the user gave that cannot be one (too long, a file where a directory belongs): a usage error
        return 2 if e.errno in (errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL) else 1


if __name__ == "__main__":
    sys.exit(main())
