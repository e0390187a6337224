"""``lmzoo convert`` and ``lmzoo merge-lora``: the format conversions of :mod:`lmzoo.formats` on the command line.

    lmzoo convert smollm2-135m-instruct out/smol --to lmzoo       # a name, GGUF, HF or lmzoo dir -> lmzoo
    lmzoo convert runs/llama out/llama.gguf --to gguf --dtype q8_0
    lmzoo merge-lora runs/ft out/merged                           # LoRA/QLoRA adapters merged into plain weights

The source is anything :func:`lmzoo.formats.load.load_any` reads; the model's tokenizer travels with it
(into an lmzoo checkpoint, a Hugging Face directory as ``tokenizer.json`` + ``tokenizer_config.json``
with the chat template, or GGUF metadata). Every write is atomic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmzoo.errors import ConfigError

FORMATS = ("lmzoo", "hf", "gguf")


def add_convert_parsers(sub: Any) -> None:
    """Register ``convert`` and ``merge-lora`` on the ``lmzoo`` subparsers."""
    c = sub.add_parser("convert", help="convert a model between lmzoo, Hugging Face and GGUF (a name works too)",
                       description="Load SRC (lmzoo checkpoint or run, Hugging Face directory, GGUF file, or a "
                       "model name from `lmzoo info --list`) and write it to DST in another format (docs/gguf.md).")
    c.add_argument("src", help="checkpoint, run, HF directory, GGUF file or model name")
    c.add_argument("dst", help="output directory (lmzoo, hf) or file (gguf)")
    c.add_argument("--to", choices=FORMATS, required=True, help="the output format")
    c.add_argument("--dtype", default=None, help="weights: float32/bfloat16/float16 (lmzoo, hf); f32, f16, bf16, "
                   "q8_0, q4_0, q4_1 (gguf). Default: the model's own")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("merge-lora", help="merge a fine-tune's LoRA/QLoRA adapters into plain weights",
                       description="Load RUN (a `lmzoo finetune` run or checkpoint with LoRA adapters), merge each "
                       "adapter into its weight (NF4 weights dequantized first) and write an ordinary model.")
    m.add_argument("run", help="fine-tune run directory or checkpoint")
    m.add_argument("out", help="output directory (lmzoo, hf) or file (gguf)")
    m.add_argument("--to", choices=FORMATS, default="lmzoo", help="the output format (default lmzoo)")
    m.add_argument("--dtype", default=None, help="as for convert")
    m.set_defaults(func=cmd_merge_lora)


def write_model(model: Any, tokenizer: Any, dst: str | Path, to: str, dtype: str | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``dst`` as ``to`` (lmzoo, hf or gguf); returns the path."""

    from lmzoo.common import resolve_dtype

    if to == "gguf":
        from lmzoo.formats.gguf import to_gguf

        return to_gguf(model, dst, dtype=dtype, tokenizer=tokenizer)
    torch_dtype = resolve_dtype(dtype)
    if to == "hf":
        from lmzoo.formats.hf import to_hf

        out = to_hf(model, dst, dtype=torch_dtype)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, out)
        return out
    from lmzoo.formats.checkpoint import save

    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return save(model, dst, tokenizer=tokenizer)


def save_hf_tokenizer(tok: Any, directory: Path) -> None:
    """``tokenizer.json`` + a transformers ``tokenizer_config.json`` (special tokens, chat template) in
    ``directory``, and ``generation_config.json`` with the BOS/EOS ids (without it transformers' ``generate``
    runs past the end of a chat turn); a tokenizer ``transformers`` has no form of (byte, char) is left out."""
    from lmzoo.formats.atomic import atomic_write_text
    from lmzoo.tokenizer import HFTokenizer

    if not isinstance(tok, HFTokenizer):
        return
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                              "bos_token": tok.bos_token, "add_bos_token": tok.add_bos}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    atomic_write_text(directory / "tokenizer.json", tok.backend.to_str())
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if tok.eos_id is not None:
        atomic_write_text(directory / "generation_config.json", json.dumps(ids, indent=2) + "\n")


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.formats.load import load_any

    model, tok = load_any(args.src)
    out = write_model(model, tok, args.dst, args.to, args.dtype)
    print(f"wrote {out} ({args.to}, {model.family}, {model.num_params():,} parameters)")
    return 0


def cmd_merge_lora(args: argparse.Namespace, extra: list[str]) -> int:
    from lmzoo.formats.load import load_any
    from lmzoo.peft.lora import lora_modules, merge_lora
    from lmzoo.peft.qlora import dequantize_model

    model, tok = load_any(args.run)
    n = len(list(lora_modules(model)))
    if n == 0:
        raise ConfigError(f"merge-lora: {args.run} has no LoRA adapters to merge")
    if getattr(model, "nf4", None):  # QLoRA: the base weights are NF4; merge into their dequantized values
        dequantize_model(model)
    merge_lora(model, unwrap=True)
    out = write_model(model, tok, args.out, args.to, args.dtype)
    print(f"merged {n} adapters: wrote {out} ({args.to})")
    return 0
