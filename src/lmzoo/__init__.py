"""lmzoo: language-model architectures from their papers, trained and compared on equal footing.

Public API::

    model = lmzoo.build("gpt2-improved", n_layer=6)      # a preset with overrides
    model = lmzoo.load("runs/latest")                    # an lmzoo checkpoint (or run directory)
    model = lmzoo.from_hf("path/to/hf-dir")              # a Hugging Face checkpoint directory
    lmzoo.to_hf(model, "out/hf")                         # ... and back
    model = lmzoo.from_gguf("model.Q4_1.gguf")           # a llama.cpp GGUF file, dequantized
    lmzoo.to_gguf(model, "out.gguf", dtype="q8_0")       # ... and back
    model, tok = lmzoo.load_any("smollm2-135m-instruct") # any of these, or a pretrained model by name
    lmzoo.complete("smollm2-135m-instruct", "The capital of France is")   # text in, text out
    lmzoo.generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
    lmzoo.train(max_steps=200)                            # a new run in runs/ (see lmzoo.TrainConfig)
"""

from __future__ import annotations

from typing import Any

from lmzoo.decoding.generate import generate
from lmzoo.errors import LmzooError
from lmzoo.formats.checkpoint import load, save
from lmzoo.models import build

__version__ = "0.1.0"


def from_hf(path, dtype=None, device="cpu", check_memory=True):
    """Load a Hugging Face checkpoint directory (family detected from config.json)."""
    from lmzoo.formats.hf import from_hf as _from_hf

    return _from_hf(path, dtype=dtype, device=device, check_memory=check_memory)


def to_hf(model, path, dtype=None):
    """Write ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads."""
    from lmzoo.formats.hf import to_hf as _to_hf

    return _to_hf(model, path, dtype=dtype)


def from_gguf(path, dtype=None, device="cpu", check_memory=True):
    """Load a GGUF file (llama.cpp's format) as an lmzoo model, dequantized to ``dtype`` (None: float32)."""
    from lmzoo.formats.gguf import from_gguf as _from_gguf

    return _from_gguf(path, dtype=dtype, device=device, check_memory=check_memory)


def to_gguf(model, path, dtype=None, tokenizer=None):
    """Write ``model`` (Llama family or GPT-2) as a GGUF file: ``dtype`` f32, f16, bf16, q8_0, q4_0 or q4_1."""
    from lmzoo.formats.gguf import to_gguf as _to_gguf

    return _to_gguf(model, path, dtype=dtype, tokenizer=tokenizer)


def load_any(source, device="cpu", dtype=None):
    """``(model, tokenizer)`` of an lmzoo checkpoint, a Hugging Face directory, a GGUF file or a model name."""
    from lmzoo.formats.load import load_any as _load_any

    return _load_any(source, device=device, dtype=dtype)


def complete(model, prompt, **kwargs: Any) -> str:
    """Text in, text out: the continuation of a string, or the answer to a list of chat messages
    (:func:`lmzoo.decoding.text.stream_complete` has the settings)."""
    from lmzoo.decoding.text import complete as _complete

    return _complete(model, prompt, **kwargs)


def stream_complete(model, prompt, **kwargs: Any):
    """:func:`complete` as an iterator of text pieces, while they are generated."""
    from lmzoo.decoding.text import stream_complete as _stream_complete

    return _stream_complete(model, prompt, **kwargs)


def train(cfg=None, **overrides: Any) -> dict[str, Any]:
    """Train with the shared trainer; ``overrides`` are :class:`TrainConfig` fields."""
    from lmzoo.train import train as _train

    return _train(cfg, **overrides)


def __getattr__(name: str):
    if name in ("TrainConfig", "Trainer"):
        from lmzoo import train as _t

        return getattr(_t, name)
    raise AttributeError(name)


__all__ = [
    "LmzooError", "build", "complete", "from_gguf", "from_hf", "generate", "load", "load_any", "save",
    "stream_complete", "to_gguf", "to_hf", "train", "__version__",
]
