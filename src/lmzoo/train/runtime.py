"""Process-level helpers of a run: the data directory (:func:`data_plan`), and RNG state capture.

Everything random in a step (dropout, data order via the loader's step counter) is restored
from a checkpoint by :func:`set_rng_state`, which is what makes ``resume=True`` bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmzoo.data.prepare import META_NAME, resolve_source, source_name
from lmzoo.errors import ConfigError, DataError
from lmzoo.train.config import TrainConfig


def _source(cfg: TrainConfig) -> str:
    """The corpus a run reads: its ``source`` (or ``input`` alone), the built-in stdlib when neither is named."""
    return resolve_source(cfg.source if cfg.source or cfg.input else "stdlib", cfg.input)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]


def default_data_dir(cfg: TrainConfig) -> Path:
    """``data/<source>-<tokenizer>``; a source or tokenizer that is a path of one's own gets a short hash of
    where it is, so that two files named ``my.txt`` (or two checkpoints' ``tokenizer/``) never share one."""
    source = _source(cfg)
    name = source_name(source)
    if Path(name).is_absolute():
        src = f"{Path(name).stem}-{_short_hash(name)}"
    else:
        src = Path(source).stem if ("/" in source or "." in source) else source
    tok = cfg.tokenizer
    if "/" in tok or Path(tok).exists():
        tok = f"{Path(tok).name}-{_short_hash(str(Path(tok).resolve()))}"
    suffix = f"{tok}{cfg.vocab_size}" if cfg.vocab_size else tok
    return Path("data") / f"{src}-{suffix}"


def data_plan(cfg: TrainConfig) -> tuple[Path, str | None]:
    """``(data directory, source to prepare into it first or None)`` for a run, checked before anything is
    written: a ``data_dir`` that is not a prepared data set is an error unless a source to prepare is named,
    and a prepared one made from another source than the one named is refused."""
    if cfg.data_dir:
        d = Path(cfg.data_dir)
        named = cfg.source or cfg.input
        if not (d / META_NAME).is_file():
            if not named:
                what = "no such directory" if not d.exists() else f"not a prepared data set (no {META_NAME})"
                raise DataError(
                    f"data_dir {d}: {what}; name a --source to prepare into it, or prepare it first "
                    f"(lmzoo prepare SOURCE --out {d})"
                )
            return d, _source(cfg)
    else:
        d, named = default_data_dir(cfg), True
        if not (d / META_NAME).is_file():
            return d, _source(cfg)
    if named:
        _check_prepared_from(d, source_name(_source(cfg)))
    return d, None


def _check_prepared_from(data_dir: Path, name: str) -> None:
    try:
        was = json.loads((data_dir / META_NAME).read_text(encoding="utf-8")).get("source_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # load_meta reports a broken meta.json
    if was is not None and was != name:  # older data sets record no source_name: nothing to compare
        raise ConfigError(
            f"data_dir {data_dir} was prepared from {was}, not {name}; choose another --data_dir for this source "
            "(or leave out --source to train on the prepared data)"
        )


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
