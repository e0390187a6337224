"""Reading and writing Hugging Face checkpoint directories, one tensor (or one shard) at a time.

A ``transformers`` model directory holds ``config.json`` and the weights in one of four layouts,
tried in this order (the order ``transformers`` itself prefers):

| file                              | layout                                                      |
|-----------------------------------|-------------------------------------------------------------|
| ``model.safetensors``             | one safetensors file                                        |
| ``model.safetensors.index.json``  | ``{"weight_map": {tensor: shard file}}`` + safetensors shards |
| ``pytorch_model.bin``             | one ``torch.save``'d state dict (a zip of pickles)          |
| ``pytorch_model.bin.index.json``  | the same index format over ``.bin`` shards                  |

Memory: :func:`iter_tensors` yields ``(name, tensor)`` pairs lazily. A safetensors file is read
tensor by tensor; a ``.bin`` shard is memory-mapped (``mmap=True``) and released before the next
one. A caller that converts and stores each tensor as it arrives therefore never holds two full
copies of the weights: only the model being filled plus one tensor in flight. The yielded
tensors may be views of a private mapping of the file (safetensors, memory-mapped ``.bin``): a
caller that keeps one unchanged should copy it so the file can be unmapped (``from_hf`` does).

Safety: ``.bin`` files are pickles, and unpickling can run arbitrary code. They are loaded only
with ``torch.load(weights_only=True)``, which refuses every global but tensors and plain
containers; a refused or corrupt file is a :class:`~lmzoo.errors.CheckpointError`, never a
traceback. Writing goes through :func:`lmzoo.formats.atomic.atomic_path`: a kill mid-write leaves the
old directory or the new one, never a half-written mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmzoo.config import read_json
from lmzoo.errors import CheckpointError, quote
from lmzoo.formats.atomic import atomic_path

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_LAYOUTS = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)  # in order of preference


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (library errors sometimes span several)."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= 300 else msg[:297] + "..."


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory.

    Raises CheckpointError naming the file when the directory or the file is missing, or the file
    is not a JSON object.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such directory")
    f = d / CONFIG
    if not f.is_file():
        raise CheckpointError(f"{f}: missing {CONFIG} (not a Hugging Face model directory?)")
    return read_json(f, CheckpointError)


def _read_index(index: Path) -> list[Path]:
    """The shard files an index names, in order of first appearance; every one must exist.

    Linear in the number of tensor names (an index may list hundreds of thousands): the shards seen so far
    are kept in a dict, which also keeps their order."""
    data = read_json(index, CheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file")
    seen: dict[str, None] = {}  # the shard names in order of first appearance
    for name, shard in weight_map.items():
        if isinstance(shard, str) and shard in seen:
            continue
        # a shard is a plain file name beside the index: refuse paths that would leave the directory
        if not isinstance(shard, str) or shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            raise CheckpointError(f"{index}: tensor {quote(name)} points to an invalid shard name {quote(shard)}")
        seen[shard] = None
    for shard in seen:
        if not os.path.isfile(os.path.join(index.parent, shard)):
            raise CheckpointError(f"{index.parent / shard}: missing shard {shard} (listed in {index.name})")
    return [index.parent / shard for shard in seen]


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face model directory, checked to exist, in reading order.

    Picks the first layout of :data:`WEIGHT_LAYOUTS` present. Raises CheckpointError naming the
    missing file (a shard listed in an index, or the weights file when there is none at all).
    """
    d = Path(directory)
    for layout in WEIGHT_LAYOUTS:
        p = d / layout
        if p.is_file():
            return _read_index(p) if layout.endswith(".index.json") else [p]
    raise CheckpointError(
        f"{d / SAFETENSORS}: missing weights file (found none of {', '.join(WEIGHT_LAYOUTS)})"
    )


# Checksums. safetensors checks that its header is consistent with the file's length, so a truncated
# file is refused, but a flipped bit in the tensor data loads silently as a wrong weight. Files lmzoo
# writes (its checkpoints and to_hf) carry a SHA-256 of their tensors in the header's metadata, under
# DIGEST_KEY (transformers ignores metadata keys it does not know); readers verify it when present.
DIGEST_KEY = "lmzoo_sha256"


def update_digest(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed one tensor (its name, dtype, shape and raw bytes) into the hash ``h``."""
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().reshape(-1)
    if flat.numel():
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().data)


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: what :data:`DIGEST_KEY` holds."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        update_digest(h, name, tensors[name])
    return h.hexdigest()


def corrupt_error(file: Path) -> CheckpointError:
    return CheckpointError(f"{file}: checksum mismatch: the tensor data changed after it was written "
                           "(corrupted file: re-copy or re-download it)")


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: all mean "not a readable safetensors file"
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({_one_line(e)})") from None
    with handle as f:
        digest = (f.metadata() or {}).get(DIGEST_KEY)
        h = hashlib.sha256() if digest else None
        for name in sorted(f.keys()):
            try:
                t = f.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({_one_line(e)})") from None
            if h is not None:
                update_digest(h, name, t)
            yield name, t  # outside the try: errors raised by the consumer are not ours to rename
        if h is not None and h.hexdigest() != digest:
            raise corrupt_error(file)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and containers only, never arbitrary objects."""
    # The zip format (torch >= 1.6) can be memory-mapped: pages are read when a tensor is touched.
    mmap = zipfile.is_zipfile(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message explains how to turn the protection off; keep only what was refused
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", str(e), re.DOTALL)
        why = _one_line(m.group(1)) if m else _one_line(e)
        raise CheckpointError(
            f"{file}: refused by torch.load(weights_only=True), which loads only tensors ({why})"
        ) from None
    except Exception as e:  # RuntimeError for a corrupt or truncated zip, EOFError, ...
        raise CheckpointError(f"{file}: unreadable PyTorch weights file ({_one_line(e)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: expected a state dict of tensor name -> tensor")
    return state


def _drain(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield and forget each entry, so a tensor is freed once its consumer has dropped it."""
    for name in list(state):
        yield name, state.pop(name)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every ``(name, tensor)`` of ``files`` (from :func:`weight_files`), on the CPU.

    Lazily: one tensor of a safetensors file at a time, one ``.bin`` shard at a time. Names
    that appear in two files raise CheckpointError.
    """
    seen: set[str] = set()
    for file in files:
        if file.suffix == ".safetensors":
            tensors = _iter_safetensors(file)
        else:
            tensors = _drain(_load_bin(file))
        for name, t in tensors:
            if name in seen:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            seen.add(name)
            yield name, t


def check_shape(source: str, tensor: torch.Tensor, expected: tuple[int, ...], note: str = "") -> None:
    """Raise CheckpointError naming ``source`` and both shapes when ``tensor`` is not ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {source!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}{note}"
        )


def _kept_files(d: Path) -> list[Path]:
    """Files of an existing directory that a rewrite keeps: everything but config and weights."""
    if not d.is_dir():
        return []

    def is_weights(p: Path) -> bool:
        return p.name == CONFIG or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")

    return [p for p in d.iterdir() if not is_weights(p)]


def write_hf_dir(
    directory: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` atomically.

    Tensors must be contiguous, on any device, and share no storage (safetensors refuses
    aliases: store tied weights once). When ``directory`` already exists, other files in it (a
    tokenizer, a README) are kept, while old weights (``*.safetensors``, ``*.bin``, their
    index) are dropped so that ``transformers`` cannot load a mix of old and new tensors.
    Returns the directory.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: exists and is not a directory")
    with atomic_path(d) as tmp:
        tmp.mkdir()
        for p in _kept_files(d):
            if p.is_dir():
                shutil.copytree(p, tmp / p.name, symlinks=True)
            else:
                shutil.copy2(p, tmp / p.name, follow_symlinks=False)
        cpu = {k: v.detach().cpu() for k, v in tensors.items()}
        save_file(cpu, str(tmp / SAFETENSORS), metadata={"format": "pt", DIGEST_KEY: tensors_digest(cpu)})
        del cpu
        (tmp / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return d


def split_fused_experts(
    hf_name: str, kind: str, t: torch.Tensor, prefix: str, n_experts: int, hidden: int, dim: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5's fused expert tensors -> lmzoo's per-expert weights under ``prefix``.

    ``gate_up_proj`` (E, 2H, C) gives ``{prefix}.{e}.gate/up.weight``; ``down_proj`` (E, C, H) gives
    ``{prefix}.{e}.down.weight``. Each slice is cloned: a view would keep the whole fused tensor alive.
    """
    E, H, C = n_experts, hidden, dim
    if kind == "gate_up_proj":
        check_shape(hf_name, t, (E, 2 * H, C))
        for e in range(E):
            yield f"{prefix}.{e}.gate.weight", t[e, :H].clone()
            yield f"{prefix}.{e}.up.weight", t[e, H:].clone()
    else:
        check_shape(hf_name, t, (E, C, H))
        for e in range(E):
            yield f"{prefix}.{e}.down.weight", t[e].clone()
