"""lmzoo's own checkpoints: a directory per checkpoint, written atomically.

    <dir>/config.json         {"family": ..., model config fields}
    <dir>/model.safetensors   the weights (tied weights stored once)
    <dir>/tokenizer/          the tokenizer, when known (lmzoo.tokenizer format)
    <dir>/train_state.pt      optional: optimizer, schedule, RNG, data position, step
                              (plain tensors and numbers, read with torch.load(weights_only=True))

A run directory holds ``ckpt-<step>`` checkpoints, ``best`` and a ``LATEST`` file naming the
newest complete one. Every checkpoint is written under a temporary name and renamed, so a kill
at any moment leaves either the previous state or the new one, never a partial directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmzoo.config import read_json
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.formats.atomic import atomic_path, atomic_write_text
from lmzoo.formats.tensors import DIGEST_KEY, corrupt_error, tensors_digest
from lmzoo.memguard import check_fits
from lmzoo.models import build_model, config_from_dict, config_to_dict
from lmzoo.models.base import LanguageModel

WEIGHTS, CONFIG, TRAIN_STATE, TOKENIZER = "model.safetensors", "config.json", "train_state.pt", "tokenizer"
LATEST = "LATEST"


def model_state(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The state dict with tied (shared) tensors kept once, contiguous, ready for safetensors."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.device.type != "meta" else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def write_checkpoint(
    model: LanguageModel,
    directory: str | Path,
    tokenizer=None,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    shards: Path | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically (a temp dir renamed into place).

    ``weights``: the tensors to write when ``model`` holds only shards of them (FSDP2, tensor or
    pipeline parallel gather them first); ``shards``: a ``torch.distributed.checkpoint`` directory
    written by every rank, moved in as ``dcp/`` (docs/distributed.md).
    """
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        weights = model_state(model) if weights is None else weights
        # a SHA-256 of the tensors in the header: load_weights refuses a file whose bytes changed since
        meta = {"format": "pt", "lmzoo": "1", DIGEST_KEY: tensors_digest(weights)}
        save_file(weights, str(tmp / WEIGHTS), metadata=meta)
        if shards is not None:
            os.replace(shards, tmp / "dcp")
        cfg = config_to_dict(model)
        quant = getattr(model, "quantization", None)  # layers rewritten from outside (lmzoo.quant)
        if quant:
            extra = {**(extra or {}), "quantization": quant}
        n_future = getattr(model, "n_future", None)  # a MultiTokenLM (lmzoo.models.mtp): its extra heads
        if n_future:
            extra = {**(extra or {}), "multi_token": {"n_future": int(n_future)}}
        extra = {**(extra or {}), **_peft_settings(model)}
        if extra:
            cfg["lmzoo"] = extra
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
    return directory


def _peft_settings(model: LanguageModel) -> dict[str, Any]:
    """What lmzoo.peft rewrote in ``model`` (NF4 layers, LoRA wrappers), so that a fine-tuning
    checkpoint loads: :func:`apply_settings` rebuilds the same modules before the weights load."""
    out: dict[str, Any] = {}
    nf4 = getattr(model, "nf4", None)  # QLoRA's NF4-quantized layers (lmzoo.peft.qlora)
    if nf4:
        out["nf4"] = dict(nf4)
    lora = getattr(model, "lora", None)  # LoRA adapters (lmzoo.peft.lora)
    if lora:
        from lmzoo.peft.lora import lora_modules

        merged = [n for n, m in lora_modules(model) if m.merged]  # their base weights hold the update
        out["lora"] = {**lora, **({"merged": merged} if merged else {})}
    return out


def save(model: LanguageModel, directory: str | Path, tokenizer=None) -> Path:
    """Save a model (and its tokenizer) as an lmzoo checkpoint directory."""
    return write_checkpoint(model, directory, tokenizer)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or a run directory (newest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory (expected a checkpoint or run directory)")
    if (p / CONFIG).exists() or (p / WEIGHTS).exists():
        return p
    latest = p / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if name and (p / name / CONFIG).is_file():
            return p / name
    ckpts = sorted(p.glob("ckpt-*"), key=lambda q: q.name)
    ckpts = [c for c in ckpts if (c / CONFIG).is_file() and (c / WEIGHTS).is_file()]
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{p}: no checkpoint found (expected {CONFIG} and {WEIGHTS}, or ckpt-* directories)")


def read_config(directory: str | Path) -> tuple[str, Any, dict[str, Any]]:
    """(family, Config, raw dict) of a checkpoint directory."""
    d = Path(directory)
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d}: missing {CONFIG}")
    try:
        raw = read_json(d / CONFIG)
    except LmzooError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(raw.get("lmzoo") or {}, dict):
        raise CheckpointError(f"{d / CONFIG}: 'lmzoo' must be a mapping of lmzoo settings")
    raw_cfg = {k: v for k, v in raw.items() if k != "lmzoo"}
    try:
        family, cfg = config_from_dict(raw_cfg)
    except LmzooError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    return family, cfg, raw


def load_weights(model: LanguageModel, file: str | Path, strict: bool = True) -> None:
    """Load safetensors weights, naming any missing, unexpected or mis-shaped tensor."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        state = load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            digest = (f.metadata() or {}).get(DIGEST_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    if digest is not None and tensors_digest(state) != digest:  # a flipped bit would load as a wrong weight
        raise corrupt_error(file)
    expected = model.state_dict()
    tied = set(expected) - set(model_state(model))
    for k, v in state.items():
        if k not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {k!r} (not in the {model.family} model)")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{file}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    missing = [k for k in expected if k not in state and k not in tied]
    if strict and missing:
        raise CheckpointError(f"{file}: missing tensor(s) {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False)


def apply_settings(model: LanguageModel, raw: dict[str, Any], where: str | Path) -> LanguageModel:
    """A freshly built model rebuilt as a checkpoint's ``lmzoo`` settings record (before its weights
    load), in the order they were applied: the extra multi-token heads around it, the quantized
    layers (BitNet), QLoRA's NF4 layers, then the LoRA wrappers (``raw``: its config).

    The settings come from a file: a malformed one is a one-line CheckpointError naming the key."""
    settings = raw.get("lmzoo") or {}  # what lmzoo.save recorded beyond the family's config
    mtp = settings.get("multi_token")
    if mtp:  # the extra prediction heads around the model
        n = mtp.get("n_future") if isinstance(mtp, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise CheckpointError(f"{where}: lmzoo.multi_token.n_future must be an integer in [1, 64], got {n!r}")
        from lmzoo.models.mtp import MultiTokenLM

        try:
            model = MultiTokenLM(model, n)
        except ConfigError as e:
            raise CheckpointError(f"{where}: lmzoo.multi_token: {e}") from None
    from lmzoo import quant
    from lmzoo.peft import lora, qlora

    # the quantized layers (lmzoo.quant, e.g. BitNet), QLoRA's NF4 base layers, the LoRA adapters
    for key, apply_spec in (("quantization", quant.apply_spec), ("nf4", qlora.apply_spec), ("lora", lora.apply_spec)):
        spec = settings.get(key)
        if spec is None:
            continue
        try:
            apply_spec(model, spec)
        except LmzooError as e:
            raise CheckpointError(f"{where}: lmzoo.{key}: {e}") from None
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         check_memory: bool = True) -> LanguageModel:
    """Load an lmzoo checkpoint (or the newest one of a run directory) as an eval-mode model.

    A model whose estimated memory exceeds what is available is refused before it is built
    (lmzoo.memguard; ``check_memory=False`` or LMZOO_NO_MEMORY_CHECK=1 skips the check).
    """
    d = resolve(path)
    family, cfg, raw = read_config(d)
    check_fits(family, cfg, "cpu", where=str(d), check=check_memory)  # built in float32 on the CPU first
    if torch.device(device).type != "cpu":
        check_fits(family, cfg, device, dtype, where=str(d), check=check_memory)
    model = apply_settings(build_model(family, cfg), raw, d / CONFIG)
    load_weights(model, d / WEIGHTS)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def load_tokenizer_of(path: str | Path):
    """The tokenizer saved with a checkpoint, or None."""
    d = resolve(path)
    if not (d / TOKENIZER).is_dir():
        return None
    from lmzoo.tokenizer import load_tokenizer

    return load_tokenizer(d / TOKENIZER)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    f = Path(directory) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{directory}: missing {TRAIN_STATE} (not a training checkpoint)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: never unpickle arbitrary objects
        raise CheckpointError(f"{f}: unreadable train state ({type(e).__name__}: {str(e)[:200]})") from None


def mark_latest(run_dir: str | Path, name: str) -> None:
    atomic_write_text(Path(run_dir) / LATEST, name + "\n")
