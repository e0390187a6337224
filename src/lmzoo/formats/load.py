"""Load "any" model a user may point at: one function every command and integration calls.

``load_any(source)`` takes an lmzoo checkpoint or run directory, or a Hugging Face ``transformers``
directory (told apart by ``config.json``: an lmzoo config names its ``family``), and returns the
model with its tokenizer (None when none was saved).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmzoo.config import JSON_MAX_BYTES, read_bounded
from lmzoo.errors import CheckpointError, LmzooError


def load_any(source: str | os.PathLike, device: str = "cpu", dtype=None):
    """``(model, tokenizer or None)`` from an lmzoo checkpoint/run directory or a Hugging Face directory."""
    from lmzoo.formats import checkpoint as ckpt

    p = Path(source)
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
    check_vocabulary(model, tok, p)
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
