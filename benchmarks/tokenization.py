"""Tokens per byte of the two offline corpora, and how fast ``prepare`` tokenizes (docs/tokenization.md,
docs/data.md). Prints JSON lines:

- ``tokens_per_byte``: for tiny Shakespeare (``--input``) and the built-in ``stdlib`` corpus, each
  tokenizer (byte, char, BPE at 1024 / 4096 / 16384) trained on the corpus it encodes: tokens (the
  ``<|endoftext|>`` separators between documents left out), tokens per byte, bytes per token, and the
  whole ``prepare`` wall time (tokenizer training included);
- ``prepare_throughput``: ``stdlib`` tokenized with an already-built tokenizer (``tokenizer=`` its
  directory, so no training is timed) by 1 and 2 worker processes: tokens (separators included),
  seconds, tokens/s and bytes of text/s.

    python benchmarks/tokenization.py --input ../shared/data/tinyshakespeare.txt
    python benchmarks/tokenization.py --input ../shared/data/tinyshakespeare.txt --only prepare_throughput

The stdlib figures depend on the Python version (its standard library is the corpus); each line
carries the corpus's ``source_sha256`` from meta.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from lmzoo.data import load_meta, prepare

KINDS = [("byte", None), ("char", None), ("bpe", 1024), ("bpe", 4096), ("bpe", 16384)]


def timed_prepare(source: str, out: Path, **kw) -> tuple[dict, float]:
    t = time.perf_counter()
    prepare(source, out, progress=False, **kw)
    return load_meta(out), time.perf_counter() - t


def tokens_per_byte(corpora: dict[str, tuple[str, str | None]], work: Path, emit) -> None:
    for name, (source, local) in corpora.items():
        for kind, vocab in KINDS:
            out = work / f"{name}-{kind}-{vocab}"
            m, seconds = timed_prepare(source, out, tokenizer=kind, vocab_size=vocab, input=local)
            separators = m["documents"] if m["split_rule"] != "contiguous" and m["eos_id"] is not None else 0
            tokens = m["train_tokens"] + m["val_tokens"] - separators
            emit({"bench": "tokens_per_byte", "corpus": name, "tokenizer": kind, "vocab_size": m["vocab_size"],
                  "tokens": tokens, "bytes": m["source_bytes"], "tokens_per_byte": round(tokens / m["source_bytes"], 3),
                  "bytes_per_token": round(m["source_bytes"] / tokens, 2), "prepare_s": round(seconds, 1),
                  "documents": m["documents"], "source_sha256": m["source_sha256"]})


def prepare_throughput(work: Path, emit) -> None:
    for kind, vocab in [("byte", None), ("char", None), ("bpe", 4096)]:
        built = work / f"tok-{kind}"
        prepare("stdlib", built, tokenizer=kind, vocab_size=vocab, progress=False)  # the tokenizer, once
        for workers in (1, 2):
            out = work / f"stdlib-{kind}-w{workers}"
            m, seconds = timed_prepare("stdlib", out, tokenizer=str(built / "tokenizer"), workers=workers)
            tokens = m["train_tokens"] + m["val_tokens"]
            emit({"bench": "prepare_throughput", "tokenizer": f"{kind} {vocab}" if vocab else kind,
                  "workers": workers, "tokens": tokens, "seconds": round(seconds, 1),
                  "m_tokens_per_s": round(tokens / seconds / 1e6, 2),
                  "mb_text_per_s": round(m["source_bytes"] / seconds / 1e6, 1), "bytes": m["source_bytes"],
                  "documents": m["documents"], "load_avg": [round(x, 2) for x in os.getloadavg()]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="tiny Shakespeare text file")
    p.add_argument("--only", nargs="+", choices=["tokens_per_byte", "prepare_throughput"],
                   default=["tokens_per_byte", "prepare_throughput"])
    args = p.parse_args()
    emit = lambda rec: print(json.dumps({**rec, "python": platform.python_version()}), flush=True)  # noqa: E731
    corpora = {"tiny shakespeare": ("shakespeare", str(args.input)), "stdlib": ("stdlib", None)}
    with tempfile.TemporaryDirectory() as tmp:
        if "tokens_per_byte" in args.only:
            tokens_per_byte(corpora, Path(tmp), emit)
        if "prepare_throughput" in args.only:
            prepare_throughput(Path(tmp), emit)


if __name__ == "__main__":
    main()
