"""Load "any" model a user may point at: one function every command and integration calls.

``load_any(source)`` takes an lmzoo checkpoint or run directory, a Hugging Face ``transformers``
directory (told apart by ``config.json``: an lmzoo config names its ``family``), a GGUF file, or the
name of a pretrained model (:mod:`lmzoo.formats.registry`, e.g. ``smollm2-135m-instruct``), and returns
the model with its tokenizer (None when none was saved). :func:`tokenizer_of` gives a loaded model's
tokenizer back later (the text API takes a model alone), :func:`display_name` the name to show for it.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from lmzoo.config import JSON_MAX_BYTES, read_bounded
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.tokenizer import Tokenizer

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the tokenizer it was loaded with


def tokenizer_of(model) -> Tokenizer | None:
    """The tokenizer :func:`load_any` returned with ``model`` (None: none, or not loaded by it)."""
    return _TOKENIZERS.get(model)


def display_name(source: str | os.PathLike) -> str:
    """The name a model loaded from ``source`` goes by (served as the model id): a registered name as is,
    a GGUF file by its stem, a directory by its name, a checkpoint inside a run directory (one with a
    LATEST file) as ``run/checkpoint`` (``runs/shakes/best`` -> ``shakes/best``, not ``best``)."""
    from lmzoo.formats import registry
    from lmzoo.formats.checkpoint import LATEST

    if registry.is_name(source):
        return str(source)
    p = Path(source)
    if p.suffix == ".gguf":
        return p.stem
    p = p.resolve()
    if (p.parent / LATEST).is_file():
        return f"{p.parent.name}/{p.name}"
    return p.name or str(source)


def is_gguf(path: Path) -> bool:
    """A file named ``*.gguf``, or any file starting with the GGUF magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_any(source: str | os.PathLike, device: str = "cpu", dtype=None, quantize: str | None = None):
    """``(model, tokenizer or None)`` from an lmzoo checkpoint/run directory, a Hugging Face directory, a
    GGUF file or a registered model name. ``quantize="int8"``: int8 weight-only linears and head, for
    decoding on a CPU with fewer bytes per token (:mod:`lmzoo.quant.int8`)."""
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize={quantize!r}: expected int8 (or none)")
    from lmzoo.formats import checkpoint as ckpt
    from lmzoo.formats import registry

    p = registry.resolve(str(source)) if registry.is_name(source) else Path(source)
    if is_gguf(p):
        from lmzoo.formats.gguf import load_gguf

        model, tok = load_gguf(p, device=device, dtype=dtype)
        return _remember(model, tok, p, quantize)
    cfg_file = p / "config.json"
    # (read within the size bound: the file may be anyone's, e.g. a 3 GB one)
    if cfg_file.is_file() and b'"family"' not in read_bounded(cfg_file, JSON_MAX_BYTES, CheckpointError):
        from lmzoo.formats.hf import from_hf
        from lmzoo.tokenizer import load_tokenizer

        model = from_hf(p, dtype=dtype, device=device)
        try:
            tok = load_tokenizer(p)
        except LmzooError:
            tok = None
    else:
        model, tok = ckpt.load(p, device=device, dtype=dtype), ckpt.load_tokenizer_of(p)
    return _remember(model, tok, p, quantize)


def _remember(model, tok, where: Path, quantize: str | None = None):
    check_vocabulary(model, tok, where)
    if quantize == "int8":
        from lmzoo.quant.int8 import quantize_model

        quantize_model(model)
    if tok is not None:
        _TOKENIZERS[model] = tok
    return model, tok


def check_vocabulary(model, tokenizer, where: str | os.PathLike) -> None:
    """CheckpointError naming both sizes when ``tokenizer`` has more ids than the model's vocabulary: its
    highest ids would index past the embedding, an IndexError in the middle of a generation otherwise."""
    vocab = getattr(model.config, "vocab_size", None)
    if tokenizer is not None and isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary only {vocab:,} "
            "(a tokenizer and a model that do not belong together)"
        )
