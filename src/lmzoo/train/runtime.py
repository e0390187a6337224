"""Process-level helpers of a run: the device, the data directory name, and RNG state capture.

Everything random in a step (dropout, data order via the loader's step counter) is restored
from a checkpoint by :func:`set_rng_state`, which is what makes ``resume=True`` bit-exact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmzoo.train.config import TrainConfig


def default_data_dir(cfg: TrainConfig) -> Path:
    src = Path(cfg.source).stem if ("/" in cfg.source or "." in cfg.source) else cfg.source
    tok = Path(cfg.tokenizer).name if "/" in cfg.tokenizer else cfg.tokenizer
    suffix = f"{tok}{cfg.vocab_size}" if cfg.vocab_size else tok
    return Path("data") / f"{src}-{suffix}"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every id to the same bytes (vocabulary and order)."""
    if a.vocab_size != b.vocab_size or type(a) is not type(b):
        return False
    if getattr(a, "special_tokens", None) != getattr(b, "special_tokens", None):
        return False

    def pieces(tok) -> list:
        dec = getattr(tok, "decode_bytes", None) or tok.decode
        out = []
        for i in range(tok.vocab_size):
            try:
                out.append(dec([i]))
            except Exception:  # an id that does not decode alone: compare that it fails in both
                out.append(None)
        return out

    return pieces(a) == pieces(b)
