"""lmzoo: language-model architectures from their papers, trained and compared on equal footing.

Public API::

    model = lmzoo.build("gpt2-improved", n_layer=6)      # a preset with overrides
    model = lmzoo.load("runs/default")                   # an lmzoo checkpoint (or run directory)
    model = lmzoo.from_hf("path/to/hf-dir")              # a Hugging Face checkpoint directory
    lmzoo.to_hf(model, "out/hf")                         # ... and back
    lmzoo.generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
    lmzoo.train(max_steps=200)                            # the trainer (see lmzoo.TrainConfig)
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


def train(cfg=None, **overrides: Any) -> dict[str, Any]:
    """Train with the shared trainer; ``overrides`` are :class:`TrainConfig` fields."""
    from lmzoo.train import train as _train

    return _train(cfg, **overrides)


def __getattr__(name: str):
    if name in ("TrainConfig", "Trainer"):
        from lmzoo import train as _t

        return getattr(_t, name)
    raise AttributeError(name)


__all__ = ["LmzooError", "build", "from_hf", "generate", "load", "save", "to_hf", "train", "__version__"]
