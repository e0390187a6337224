"""GGUF files (llama.cpp, Ollama, LM Studio) in and out: docs/gguf.md.

    model = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")          # dequantized, float32 by default
    tok = tokenizer_of_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # rebuilt from the metadata
    to_gguf(model, "out.gguf", dtype="q8_0", tokenizer=tok)       # runs in llama.cpp

- :mod:`.reader`: the file's metadata and tensor table, every count checked against the file's size
  before anything is allocated; tensors dequantized by the ``gguf`` package;
- :mod:`.arch`: each GGUF architecture (llama, gpt2) mapped onto Hugging Face names and configs, so
  that lmzoo's HF converters build the model (:func:`lmzoo.formats.hf.load_converted`);
- :mod:`.tokenizer`: the tokenizer rebuilt from ``tokenizer.ggml.*`` as a ``tokenizers`` tokenizer;
- :mod:`.writer`: :func:`to_gguf`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from lmzoo.common import resolve_dtype
from lmzoo.errors import CheckpointError, LmzooError
from lmzoo.formats.gguf.arch import arch_of
from lmzoo.formats.gguf.reader import GGUFFile, read
from lmzoo.formats.gguf.tokenizer import tokenizer_from_gguf
from lmzoo.formats.gguf.writer import to_gguf
from lmzoo.models.base import LanguageModel
from lmzoo.tokenizer import HFTokenizer


def _config(f: GGUFFile):
    """(arch, HF config dict, converter, lmzoo config) of an open file; one-line CheckpointErrors."""
    from lmzoo.formats.hf import checked_config, detect

    arch = arch_of(f)
    hf_config = arch.hf_config(f)
    conv = detect(hf_config, str(f.path))
    return arch, hf_config, conv, checked_config(conv, hf_config, str(f.path))


def gguf_config(path: str | os.PathLike) -> tuple[str, Any]:
    """``(family, lmzoo config)`` a GGUF file describes, from its metadata alone (no tensor is read)."""
    with read(path) as f:
        _, _, conv, cfg = _config(f)
        return conv.family, cfg


def from_gguf(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
              check_memory: bool = True) -> LanguageModel:
    """Load a GGUF file as an lmzoo model in eval mode, its tensors dequantized to ``dtype`` (None:
    float32) on ``device``, one at a time (peak memory: the model plus one tensor).

    Every check comes before any tensor is read: the architecture is one lmzoo reads (llama, gpt2),
    the metadata's counts agree with the tensors present, every tensor is known, of the shape the
    metadata implies and of a type the gguf package dequantizes. Anything else is a one-line
    CheckpointError naming the file and the problem.
    """
    from lmzoo.formats.hf import load_converted

    with read(path) as f:
        arch, hf_config, conv, cfg = _config(f)
        where = str(f.path)
        try:
            arch.check_tensors(f, hf_config)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        f.check_readable()
        dtype = resolve_dtype(dtype) or torch.float32

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name in f.tensors:  # file order: each tensor dequantized, renamed, handed on, released
                yield from arch.to_hf(name, f.tensor(name, dtype), hf_config)

        return load_converted(conv, cfg, tensors(), where, dtype, device, check_memory, owned=True)


def tokenizer_of_gguf(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer a GGUF file's metadata describes (CheckpointError when it has none lmzoo rebuilds)."""
    with read(path) as f:
        return tokenizer_from_gguf(f)


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | str | None = None) -> tuple[LanguageModel, HFTokenizer | None]:
    """``(model, tokenizer)`` of a GGUF file; the tokenizer is None (with a warning naming why) when the
    file holds none lmzoo rebuilds: the model alone still loads."""
    import warnings

    model = from_gguf(path, dtype=dtype, device=device)
    try:
        tok = tokenizer_of_gguf(path)
    except LmzooError as e:
        warnings.warn(f"no tokenizer: {e}", stacklevel=2)
        tok = None
    return model, tok


__all__ = ["GGUFFile", "from_gguf", "gguf_config", "load_gguf", "read", "to_gguf", "tokenizer_of_gguf"]
