"""Load "any" model a user may point at: one function every command and integration calls.

``load_any(source)`` takes an lmzoo checkpoint or run directory, or a Hugging Face ``transformers``
directory (told apart by ``config.json``: an lmzoo config names its ``family``), and returns the
model with its tokenizer (None when none was saved).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmzoo.errors import LmzooError


def load_any(source: str | os.PathLike, device: str = "cpu", dtype=None):
    """``(model, tokenizer or None)`` from an lmzoo checkpoint/run directory or a Hugging Face directory."""
    from lmzoo.formats import checkpoint as ckpt

    p = Path(source)
    cfg_file = p / "config.json"
    if cfg_file.is_file() and '"family"' not in cfg_file.read_text(errors="replace"):
        from lmzoo.formats.hf import from_hf
        from lmzoo.tokenizer import load_tokenizer

        model = from_hf(p, dtype=dtype, device=device)
        try:
            tok = load_tokenizer(p)
        except LmzooError:
            tok = None
        return model, tok
    return ckpt.load(p, device=device, dtype=dtype), ckpt.load_tokenizer_of(p)
